"""Adapters: the task-specific modules an adapt kept (``save_adapter``), and predictions with them: one adapter
(``POST /v1/adapters/{id}/predict``, JSON or image files) or many in one request (``POST /v1/adapters/predict``)."""

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from schemas.api import BatchPredictOut, BatchPredictRequest, PredictOut, PredictRequest
from store.models import Adapter, MetaModelRow

from ..bodies import OFF_PROCESS_ABOVE, off_loop, parse_json, read_capped
from ..deps import Session, Tenant, own_adapter
from ..dispatch import run_adapt
from ..errors import ApiError, json_body, unprocessable
from ..images import PREDICT_FORM, is_multipart, predict_payload, read_form
from ..validation import as_array, check_inputs, model_shape

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])


@router.post("/predict", response_model=BatchPredictOut, openapi_extra=json_body(BatchPredictRequest))
async def predict_many(request: Request, t: Tenant):
    """Predictions of many adapters in one request: ``items`` of ``{adapter_id, x}``, answered in their order.
    The adapt worker groups the items by model and runs the adapters of a model whose queries have the same
    number of rows as one forward (vmap over the adapters). 404 naming the item whose adapter is not the
    caller's; 422 naming the item whose ``x`` does not fit its model; at most ``adapt_batch_max_items`` items,
    ``adapt_max_rows`` rows per item and ``adapt_batch_max_rows`` rows in all."""
    from worker.celery_app import ADAPTERS_PREDICT
    app = request.app
    st = app.state.settings
    raw = await read_capped(request, st.adapt_max_bytes)
    caps = (st.adapt_batch_max_items, st.adapt_max_rows, st.adapt_batch_max_rows)

    def answer(items):
        return run_adapt(app, t, None, batch_payload(app, t, items), ADAPTERS_PREDICT)
    if len(raw) <= OFF_PROCESS_ABOVE:  # parse, lookup and the adapt queue's round trip in one worker thread
        return await run_in_threadpool(lambda: answer(json_batch_items(raw, *caps)))
    items = await off_loop(app, json_batch_items, raw, *caps)
    return await run_in_threadpool(answer, items)


@router.api_route("/predict", methods=["GET", "PUT", "PATCH", "DELETE"], include_in_schema=False)
def predict_many_other_methods():
    """``/v1/adapters/predict`` is a path of its own (OpenAPI matches concrete paths before templates): the
    methods of ``/v1/adapters/{adapter_id}`` are 405 here, not an adapter named "predict"."""
    raise StarletteHTTPException(405)


def json_batch_items(raw: bytes, max_items: int, max_rows: int, max_total: int) -> list:
    """A batch predict body decoded (in a parser process when it is large): ``[(adapter_id, x array)]``, each
    ``x`` numbers of one shape per row; the caps checked (the item count is in the document too)."""
    req = parse_json(raw, BatchPredictRequest)
    if len(req.items) > max_items:
        raise unprocessable(["items"], f"{len(req.items)} items is above the cap of {max_items} adapters per request")
    total = 0
    out = []
    for i, it in enumerate(req.items):
        if len(it.x) > max_rows:
            raise unprocessable(["items", i, "x"], f"{len(it.x)} rows is above the cap of {max_rows} rows")
        total += len(it.x)
        if total > max_total:
            raise unprocessable(["items", i, "x"], f"the items up to this one have {total} rows, above the cap of "
                                                   f"{max_total} rows per request")
        out.append((it.adapter_id, as_array(it.x, ["items", i, "x"])))
    return out


def batch_payload(app, t: str, items: list) -> dict:
    """The worker's payload: every adapter the tenant's (else 404 naming the first item that is not), every ``x``
    checked against its adapter's model, and the shas the adapt processes key their memory by."""
    ids = sorted({aid for aid, _ in items})
    with app.state.db.session() as s:
        rows = {r[0]: r for r in s.execute(
            select(Adapter.id, Adapter.sha256, MetaModelRow.id, MetaModelRow.sha256, MetaModelRow.input_shape)
            .join(MetaModelRow, MetaModelRow.id == Adapter.model_id)
            .where(Adapter.id.in_(ids), Adapter.tenant == t)).all()}
    out = []
    for i, (aid, x) in enumerate(items):
        if aid not in rows:
            raise ApiError(404, f"items.{i}.adapter_id: adapter {aid} not found",
                           [{"loc": ["items", i, "adapter_id"], "msg": f"adapter {aid} not found"}])
        _, a_sha, mid, m_sha, shape = rows[aid]
        out.append({"adapter_id": aid, "adapter_sha256": a_sha, "model_id": mid, "model_sha256": m_sha,
                    "x": check_inputs(x, ["items", i, "x"], tuple(shape))})
    return {"items": out}


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
            return m, {"model_id": m.id, "model_sha256": m.sha256, "adapter_sha256": a.sha256}
    if is_multipart(request):
        form = await read_form(request, app.state.settings)
        try:
            m, ids = await run_in_threadpool(lookup)
            payload = await run_in_threadpool(predict_payload, app, m, form)
        finally:
            await form.close()
        return await run_in_threadpool(run_adapt, app, t, adapter_id, {**payload, **ids}, ADAPTER_PREDICT)
    raw = await read_capped(request, app.state.settings.adapt_max_bytes)
    max_rows = app.state.settings.adapt_max_rows
    if len(raw) <= OFF_PROCESS_ABOVE:  # lookup, parse and the adapt queue's round trip in one worker thread
        def answer():
            m, ids = lookup()
            payload = json_predict_payload(raw, model_shape(m), max_rows)
            return run_adapt(app, t, adapter_id, {**payload, **ids}, ADAPTER_PREDICT)
        return await run_in_threadpool(answer)
    m, ids = await run_in_threadpool(lookup)
    payload = await off_loop(app, json_predict_payload, raw, model_shape(m), max_rows)
    return await run_in_threadpool(run_adapt, app, t, adapter_id, {**payload, **ids}, ADAPTER_PREDICT)


def json_predict_payload(raw: bytes, m, max_rows: int) -> dict:
    """A JSON predict body decoded and checked (in a parser process when it is large, ``api.bodies.off_loop``)."""
    req = parse_json(raw, PredictRequest)
    if len(req.x) > max_rows:
        raise unprocessable(["x"], f"{len(req.x)} rows is above the cap of {max_rows} rows")
    return {"x": check_inputs(as_array(req.x, "x"), "x", tuple(m.input_shape))}
