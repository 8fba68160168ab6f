"""Meta-datasets: upload (multipart; validated, then stored as safetensors), list, read."""

from typing import Optional

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select

from store.datasets import put_collection
from store.models import Dataset, new_id, utcnow

from ..bodies import read_capped
from ..deps import Limit, Session, Tenant, own_dataset, page
from ..errors import ApiError, unprocessable
from ..views import dataset_view

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "kind"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "a zip of class folders, or a CSV/NPZ of regression points"},
        "kind": {"type": "string", "enum": ["image_classes", "regression"]},
        "name": {"type": "string"},
        "min_per_class": {"type": "integer", "description": "images each class needs (image_classes)"},
        "min_points": {"type": "integer", "description": "points each task needs (regression)"}}}}}}}


@router.post("", status_code=201, openapi_extra=UPLOAD_BODY)
async def upload_dataset(request: Request, t: Tenant):
    """Upload a meta-dataset (multipart: ``file``, ``kind``); validated, then stored as safetensors."""
    settings = request.app.state.settings
    raw = await read_capped(request, settings.dataset_max_bytes)
    request._body = raw  # starlette's form parser reads the cached body
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as e:
        raise ApiError(422, f"not a multipart form: {e}", [{"loc": ["body"], "msg": str(e)}])
    f, kind = form.get("file"), form.get("kind")
    if f is None or isinstance(f, str):
        raise unprocessable(["body", "file"], "a file is required in the multipart field 'file'")
    if kind not in ("image_classes", "regression"):
        raise unprocessable(["body", "kind"], f"kind must be 'image_classes' or 'regression', got {kind!r}")
    opts = {}
    for field, lo in (("min_per_class", 1), ("min_points", 1)):
        v = form.get(field)
        if v is None:
            continue
        if not str(v).isdigit() or int(v) < lo:
            raise unprocessable(["body", field], f"must be an integer >= {lo}")
        opts[field] = int(v)
    if ("min_per_class" in opts and kind != "image_classes") or ("min_points" in opts and kind != "regression"):
        raise unprocessable(["body"], "min_per_class is for image_classes, min_points for regression")
    data = await f.read()
    if kind == "image_classes":
        opts["max_total_pixels"] = settings.dataset_max_pixels
    fname = f.filename or "upload"
    name = form.get("name") or fname
    return await run_in_threadpool(_store_dataset, request.app, t, kind, str(name)[:256], fname, data, opts)


def _store_dataset(app, t, kind, name, fname, data, opts):
    from datasets.upload import UploadError, validate_upload
    try:
        coll = validate_upload(data, fname, kind, **opts)
    except UploadError as e:
        raise ApiError(422, str(e), [{"loc": ["body", "file"], "msg": str(e), "file": e.file,
                                      "member": e.member, "problem": e.problem}])
    did = new_id("ds")
    art = put_collection(app.state.store, f"datasets/{t}/{did}.safetensors", coll)
    with app.state.db.session() as s:
        d = Dataset(id=did, tenant=t, kind=kind, name=name, summary=coll.summary(), uri=art.uri,
                    sha256=art.sha256, bytes=art.bytes, created_at=utcnow())
        s.add(d)
        s.flush()
        return JSONResponse(dataset_view(d), status_code=201)


@router.get("")
def list_datasets(s: Session, t: Tenant, limit: Limit = 20, cursor: Optional[str] = None):
    return page(s, select(Dataset).where(Dataset.tenant == t), Dataset, limit, cursor, dataset_view)


@router.get("/{dataset_id}")
def get_dataset(dataset_id: str, s: Session, t: Tenant):
    return dataset_view(own_dataset(s, t, dataset_id))
