"""Meta-datasets: upload (multipart; limits checked from headers here, decoded by a worker), list (with the
tenant's storage usage), read.

``POST /v1/datasets`` does in the API process only what cannot hurt it: the body streams to a temporary file,
capped (``dataset_max_bytes``), at most ``upload_concurrency`` at a time; then the header pass (store/uploads.py) reads the zip's directory and each image's
header, never pixel data, and refuses an upload over ``dataset_max_images``, ``dataset_max_image_pixels``,
``dataset_max_pixels`` or ``dataset_max_values`` with 413 (malformed ones: 422), naming the member; the tenant's
quota (``tenant_quota_bytes``) is checked against the estimate of what the upload will store (413). Then the raw
bytes go to the artifact store, the dataset is recorded ``processing`` and the answer is 202; a worker on the
``datasets`` queue (worker/dataset_tasks.py) decodes it and the dataset becomes ``ready`` or ``failed`` with the
error. Jobs accept only ready datasets.
"""

import asyncio
import re

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select

from store.datasets import lock_quota, quota_problem, tenant_usage
from store.models import Dataset, new_id, utcnow

from ..bodies import refuse_announced
from ..deps import Cursor, Limit, Session, Tenant, own_dataset, page
from ..dispatch import enqueue_dataset, try_send
from ..errors import ApiError, unprocessable
from ..views import dataset_view

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "kind"], "properties": {
        "file": {"type": "string", "format": "binary",
                 "description": "a zip of class folders, or a CSV/NPZ of regression points"},
        "kind": {"type": "string", "enum": ["image_classes", "regression"]},
        "name": {"type": "string"},
        "min_per_class": {"type": "integer", "minimum": 1, "description": "images each class needs (image_classes)"},
        "min_points": {"type": "integer", "minimum": 1, "description": "points each task needs (regression)"}}}}}}}
DATASET_SCHEMA = {
    "type": "object", "required": ["id", "kind", "status", "bytes", "created_at"], "additionalProperties": True,
    "description": "the summary's counts and shapes (kind-specific keys) with these fields",
    "properties": {
        "id": {"type": "string"}, "kind": {"type": "string", "enum": ["image_classes", "regression"]},
        "name": {"type": ["string", "null"]},
        "status": {"type": "string", "enum": ["processing", "ready", "failed"]},
        "error": {"anyOf": [{"type": "object", "properties": {"message": {"type": "string"}}}, {"type": "null"}],
                  "description": "why it failed: the file, the member and the problem"},
        "sha256": {"type": ["string", "null"], "description": "of the stored collection, once ready"},
        "bytes": {"type": "integer", "description": "what it stores and counts against the tenant's quota "
                                                    "(processing: the estimate reserved; failed: 0)"},
        "created_at": {"type": "string", "format": "date-time"},
        "upload": {"type": "object", "description": "while processing: the file name, its size and the options"}}}
USAGE_SCHEMA = {"type": "object", "required": ["bytes", "quota"], "properties": {
    "bytes": {"type": "integer", "description": "bytes the tenant's datasets store"},
    "quota": {"type": ["integer", "null"], "description": "METASHRINK_TENANT_QUOTA_BYTES; null: unlimited"}}}
UPLOAD_RESPONSES = {
    202: {"description": "Accepted: the headers passed every limit and the upload fits the tenant's quota. The "
                         "dataset is recorded with status `processing` (its counts from the headers); a worker "
                         "decodes it, then `GET /v1/datasets/{id}` shows `ready` (summary, sha256, bytes) or "
                         "`failed` (`error.message` names the file, the member and the problem).",
          "content": {"application/json": {"schema": DATASET_SCHEMA}}},
    413: {"description": "Payload Too Large: the body is over the upload cap, the archive over a limit checked from "
                         "the headers (images, pixels per image, pixels in all, regression numbers; the member that "
                         "crosses it is named), or storing it would exceed the tenant's quota (usage and quota are "
                         "named)."},
    422: {"description": "Unprocessable Entity: not a multipart form, a bad field, or a malformed upload found by "
                         "the header pass (not a zip, unreadable image header, folder layout, inconsistent shapes, "
                         "too few images per class, CSV header); problems found while decoding come later, as "
                         "status `failed`."},
}


@router.post("", status_code=202, openapi_extra=UPLOAD_BODY, responses=UPLOAD_RESPONSES)
async def upload_dataset(request: Request, t: Tenant):
    """Upload a meta-dataset (multipart: ``file``, ``kind``): checked from its headers, then decoded by a
    worker (202 with status ``processing``; poll ``GET /v1/datasets/{id}`` until ``ready`` or ``failed``)."""
    settings = request.app.state.settings
    app = request.app
    if getattr(app.state, "upload_slots", None) is None:
        app.state.upload_slots = asyncio.Semaphore(settings.upload_concurrency)
    if app.state.upload_slots.locked():
        raise ApiError(503, f"{settings.upload_concurrency} uploads are in progress at this API process "
                            f"(METASHRINK_UPLOAD_CONCURRENCY); retry shortly", headers={"Retry-After": "5"})
    async with app.state.upload_slots:
        return await _upload(request, t, settings)


def _capped(receive, cap: int):
    """The ASGI receive channel of a request, refusing (413) a body past ``cap`` bytes as it streams in."""
    n = 0

    async def wrapped():
        nonlocal n
        message = await receive()
        if message["type"] == "http.request":
            n += len(message.get("body", b""))
            if n > cap:
                raise ApiError(413, f"request body is above the cap of {cap} bytes",
                               [{"loc": ["body"], "msg": f"above the cap of {cap} bytes"}])
        return message
    return wrapped


async def _upload(request: Request, t: str, settings):
    """The body streams into the multipart parser, which spools the file to a temporary file (on disk above
    1 MiB): no copy of the upload is held in memory, here or below (the header pass and the store read it from
    that file in place, in 1 MiB chunks)."""
    refuse_announced(request, settings.dataset_max_bytes)
    streamed = Request(request.scope, _capped(request.receive, settings.dataset_max_bytes))
    try:
        form = await streamed.form(max_files=1, max_fields=16)
    except ApiError:
        raise
    except Exception as e:
        raise ApiError(422, f"not a multipart form: {e}", [{"loc": ["body"], "msg": str(e)}])
    try:
        return await _accept_form(request, t, form)
    finally:
        await form.close()


async def _accept_form(request: Request, t: str, form):
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
        if not re.fullmatch(r"[0-9]{1,9}", str(v)) or int(v) < lo:  # ASCII digits only: int("٣") is 3
            raise unprocessable(["body", field], f"must be an integer >= {lo}")
        opts[field] = int(v)
    if ("min_per_class" in opts and kind != "image_classes") or ("min_points" in opts and kind != "regression"):
        raise unprocessable(["body"], "min_per_class is for image_classes, min_points for regression")
    fname = f.filename or "upload"
    name = form.get("name") or fname
    for field, v in (("name", name), ("file", fname)):
        if "\x00" in str(v):  # PostgreSQL text cannot hold it; refused on every database alike
            raise unprocessable(["body", field], "NUL (0x00) characters are not allowed")
    return await run_in_threadpool(_accept_upload, request.app, t, kind, str(name)[:256], fname, f.file, opts)


def _accept_upload(app, t, kind, name, fname, data, opts):
    """``data``: the spooled upload file, read in place."""
    from store.uploads import UploadError, UploadLimits, scan_upload  # torch-free (datasets/ imports core)

    settings = app.state.settings
    try:
        scan = scan_upload(data, fname, kind, UploadLimits.from_settings(settings), **opts)
    except UploadError as e:
        raise ApiError(e.status, str(e), [{"loc": ["body", "file"], "msg": str(e), "file": e.file,
                                           "member": e.member, "problem": e.problem}])
    did = new_id("ds")
    est = scan.estimated_bytes
    with app.state.db.session() as s:  # refused before anything is written; checked again below, serialised
        problem = quota_problem(tenant_usage(s, t) + est, est, settings.tenant_quota_bytes)
    if problem:
        raise ApiError(413, problem, [{"loc": ["body", "file"], "msg": problem}])
    art = app.state.store.put_file(f"uploads/{t}/{did}.raw", data)  # deleted by the worker once processed
    summary = {**scan.summary(), "upload": {"file": fname, "bytes": art.bytes, **opts}}
    try:
        with app.state.db.session() as s:
            lock_quota(s, t)
            now = utcnow()
            d = Dataset(id=did, tenant=t, kind=kind, name=name, summary=summary, uri=art.uri, sha256=art.sha256,
                        bytes=est, status="processing", attempts=0, enqueued_at=now, created_at=now)
            s.add(d)
            s.flush()  # written before the usage is read: see store.datasets.lock_quota
            problem = quota_problem(tenant_usage(s, t), est, settings.tenant_quota_bytes)
            if problem:
                raise ApiError(413, problem, [{"loc": ["body", "file"], "msg": problem}])
            view = dataset_view(d)
    except BaseException:
        app.state.store.delete(art.uri)
        raise
    try_send(enqueue_dataset, app, did)
    return JSONResponse(view, status_code=202)


@router.get("", responses={200: {"description": "a page of datasets and the tenant's usage", "content": {
    "application/json": {"schema": {"type": "object", "required": ["items", "next_cursor", "usage"], "properties": {
        "items": {"type": "array", "items": DATASET_SCHEMA}, "next_cursor": {"type": ["string", "null"]},
        "usage": USAGE_SCHEMA}}}}}})
def list_datasets(request: Request, s: Session, t: Tenant, limit: Limit = 20, cursor: Cursor = None):
    """The tenant's datasets (newest first) and ``usage``: the bytes they store (processing ones: their
    estimate) and the quota (``null``: unlimited)."""
    out = page(s, select(Dataset).where(Dataset.tenant == t), Dataset, limit, cursor, dataset_view)
    quota = request.app.state.settings.tenant_quota_bytes
    return {**out, "usage": {"bytes": tenant_usage(s, t), "quota": quota or None}}


@router.get("/{dataset_id}", responses={200: {"description": "the dataset: status processing, ready or failed",
                                               "content": {"application/json": {"schema": DATASET_SCHEMA}}}})
def get_dataset(dataset_id: str, s: Session, t: Tenant):
    return dataset_view(own_dataset(s, t, dataset_id))
