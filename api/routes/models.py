"""Published meta-models: list, read, download, and adapt to a support set (answered by the adapt workers)."""

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy import select

from schemas.api import AdaptOut, AdaptRequest, ModelOut, ModelPage
from store.models import MetaModelRow
from store.preprocessing import of_model
from store.settings import Settings

from ..bodies import OFF_PROCESS_ABOVE, off_loop, parse_json, read_capped
from ..deps import Cursor, Limit, Session, Tenant, artifact_file, own_model, page
from ..dispatch import run_adapt
from ..errors import json_body
from ..images import ADAPT_FORM, adapt_payload, is_multipart, read_form
from ..validation import model_shape, validate_adapt
from ..views import model_view

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelPage)
def list_models(s: Session, t: Tenant, limit: Limit = 20, cursor: Cursor = None):
    return page(s, select(MetaModelRow).where(MetaModelRow.tenant == t), MetaModelRow, limit, cursor,
                lambda m: model_view(m, of_model(s, m)[0]))


@router.get("/{model_id}", response_model=ModelOut)
def get_model(model_id: str, s: Session, t: Tenant):
    m = own_model(s, t, model_id)
    return model_view(m, of_model(s, m)[0])


@router.get("/{model_id}/file", response_class=FileResponse)
def model_file(model_id: str, request: Request, s: Session, t: Tenant):
    m = own_model(s, t, model_id)
    return artifact_file(request, m.uri, f"model {model_id}", f"{model_id}.safetensors", m.sha256)


@router.post("/{model_id}/adapt", response_model=AdaptOut, openapi_extra=json_body(AdaptRequest, ADAPT_FORM))
async def adapt(model_id: str, request: Request, t: Tenant):
    """A JSON body of arrays, or a multipart form of image files (api/images.py) preprocessed as in training."""
    app = request.app
    if is_multipart(request):
        form = await read_form(request, app.state.settings)
        try:
            m = await run_in_threadpool(detached_model, app, t, model_id)
            payload = await run_in_threadpool(adapt_payload, app, m, form)
        finally:
            await form.close()
        payload.update(tenant=t, model_sha256=m.sha256)
        return await run_in_threadpool(run_adapt, app, t, model_id, payload)
    raw = await read_capped(request, app.state.settings.adapt_max_bytes)
    if len(raw) <= OFF_PROCESS_ABOVE:  # lookup, parse and the adapt queue's round trip in one worker thread
        return await run_in_threadpool(adapt_json, app, t, model_id, raw)
    m = await run_in_threadpool(detached_model, app, t, model_id)
    payload = await off_loop(app, json_adapt_payload, raw, model_shape(m), app.state.settings)
    # the sha names the file the adapt processes keep the model by (a hit needs no database: worker/resident.py)
    payload.update(tenant=t, model_sha256=m.sha256)
    return await run_in_threadpool(run_adapt, app, t, model_id, payload)


def adapt_json(app, t: str, model_id: str, raw: bytes):
    """A small JSON adapt request from lookup to answer, in the calling thread."""
    m = detached_model(app, t, model_id)
    payload = json_adapt_payload(raw, model_shape(m), app.state.settings)
    payload.update(tenant=t, model_sha256=m.sha256)
    return run_adapt(app, t, model_id, payload)


def json_adapt_payload(raw: bytes, m, settings: Settings) -> dict:
    """A JSON adapt body decoded and checked against the model (in a parser process when it is large,
    ``api.bodies.off_loop``); the arrays come back as numpy arrays, cheap to pass between processes."""
    req = parse_json(raw, AdaptRequest)
    return {**validate_adapt(req, m, settings), "save_adapter": req.save_adapter}


def detached_model(app, t: str, model_id: str) -> MetaModelRow:
    with app.state.db.session() as s:
        m = own_model(s, t, model_id)
        s.expunge(m)
        return m
