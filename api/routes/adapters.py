"""Adapters: the task-specific modules an adapt kept (``save_adapter``), and predictions with them."""

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from schemas.api import PredictOut, PredictRequest
from store.models import MetaModelRow

from ..bodies import off_loop, parse_json, read_capped
from ..deps import Session, Tenant, own_adapter
from ..dispatch import run_adapt
from ..errors import json_body, unprocessable
from ..images import PREDICT_FORM, is_multipart, predict_payload, read_form
from ..validation import as_array, check_inputs, model_shape

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@router.get("/{adapter_id}")
def get_adapter(adapter_id: str, s: Session, t: Tenant):
    a = own_adapter(s, t, adapter_id)
    return {"id": a.id, "model_id": a.model_id, "modules": a.modules, "steps": a.steps, "bytes": a.bytes,
            "sha256": a.sha256, "created_at": a.created_at}


@router.post("/{adapter_id}/predict", response_model=PredictOut,
             openapi_extra=json_body(PredictRequest, PREDICT_FORM))
async def adapter_predict(adapter_id: str, request: Request, t: Tenant):
    """A JSON body of arrays, or a multipart form of image files ``x`` (api/images.py) preprocessed as in training."""
    from worker.celery_app import ADAPTER_PREDICT
    app = request.app

    def lookup():
        with app.state.db.session() as s:
            a = own_adapter(s, t, adapter_id)
            m = s.get(MetaModelRow, a.model_id)
            s.expunge(m)
            return m
    if is_multipart(request):
        form = await read_form(request, app.state.settings)
        try:
            m = await run_in_threadpool(lookup)
            payload = await run_in_threadpool(predict_payload, app, m, form)
        finally:
            await form.close()
        return await run_in_threadpool(run_adapt, app, t, adapter_id, payload, ADAPTER_PREDICT)
    raw = await read_capped(request, app.state.settings.adapt_max_bytes)
    m = await run_in_threadpool(lookup)
    payload = await off_loop(app, json_predict_payload, raw, model_shape(m), app.state.settings.adapt_max_rows)
    return await run_in_threadpool(run_adapt, app, t, adapter_id, payload, ADAPTER_PREDICT)


def json_predict_payload(raw: bytes, m, max_rows: int) -> dict:
    """A JSON predict body decoded and checked (in a parser process when it is large, ``api.bodies.off_loop``)."""
    req = parse_json(raw, PredictRequest)
    if len(req.x) > max_rows:
        raise unprocessable(["x"], f"{len(req.x)} rows is above the cap of {max_rows} rows")
    return {"x": check_inputs(as_array(req.x, "x"), "x", tuple(m.input_shape))}
