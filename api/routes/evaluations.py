"""Evaluations of a model over many tasks (queued on the train workers), and their results."""

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import select

from schemas.api import EvaluationOut, EvaluationRequest
from store.models import Evaluation, new_id, utcnow

from ..bodies import read_json
from ..deps import Session, Tenant, own_model
from ..dispatch import enqueue_evaluation, try_send
from ..errors import ApiError, json_body, unprocessable
from ..views import evaluation_view

router = APIRouter(tags=["evaluations"])


@router.post("/v1/models/{model_id}/evaluations", status_code=202, openapi_extra=json_body(EvaluationRequest, required=False))
async def create_evaluation(model_id: str, request: Request, t: Tenant):
    settings = request.app.state.settings
    req = await read_json(request, 64 * 1024, EvaluationRequest, empty=b"{}",
                          object_msg="body: must be a JSON object")
    if max(req.steps) > settings.adapt_max_steps:
        raise unprocessable(["steps"], f"{max(req.steps)} is above the cap of {settings.adapt_max_steps} steps")
    return await run_in_threadpool(_create_evaluation, request.app, t, model_id, req)


def _create_evaluation(app, t, model_id, req: EvaluationRequest):
    with app.state.db.session() as s:
        m = own_model(s, t, model_id)
        if isinstance(req.modules, list):
            names = [r["name"] for r in m.module_map]
            unknown = [x for x in req.modules if x not in names]
            if unknown or not req.modules:
                raise unprocessable(["modules"], f"unknown modules {unknown}; this model's modules are {names}"
                                    if unknown else "an empty list adapts nothing")
        now = utcnow()
        e = Evaluation(id=new_id("eval"), tenant=t, model_id=model_id, status="queued",
                       request=req.model_dump(mode="json"), done_tasks=0, total_tasks=req.n_tasks, attempts=0,
                       created_at=now, updated_at=now, enqueued_at=now)
        s.add(e)
    try_send(enqueue_evaluation, app, e.id)
    return JSONResponse({"id": e.id, "status": "queued"}, status_code=202)


@router.get("/v1/evaluations/{eval_id}", response_model=EvaluationOut)
def get_evaluation(eval_id: str, s: Session, t: Tenant):
    e = s.get(Evaluation, eval_id)
    if e is None or e.tenant != t:
        raise ApiError(404, f"evaluation {eval_id} not found")
    return evaluation_view(e)


@router.get("/v1/models/{model_id}/evaluations")
def list_evaluations(model_id: str, s: Session, t: Tenant):
    own_model(s, t, model_id)
    rows = s.scalars(select(Evaluation).where(Evaluation.model_id == model_id, Evaluation.tenant == t)
                     .order_by(Evaluation.created_at.desc(), Evaluation.id.desc()).limit(100)).all()
    return {"items": [evaluation_view(e) for e in rows]}
