"""DELETE for every resource a tenant owns: jobs, models, checkpoints, datasets, adapters, evaluations.

The dependency rules between them live in one place, ``store.lifecycle`` (its docstring; each route restates
its own). Every delete answers 204 on success, 404 for an unknown id or another tenant's (as every read does),
and 409 (problem+json naming what still depends on the resource) where a rule refuses it. Rows go in one
transaction; the artifact files are removed from the store after it commits.
"""

import asyncio
import time

from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select, update

from store import lifecycle as L
from store.jobs import ACTIVE, request_cancel
from store.models import Checkpoint, Evaluation, Job, utcnow

from ..deps import Session, Tenant, own_adapter, own_dataset, own_job, own_model
from ..dispatch import announce_eviction
from ..errors import ApiError

router = APIRouter()
NO_CONTENT = dict(status_code=204, response_class=Response)


def _delete(request: Request, s, fn, *rows) -> Response:
    try:
        artifacts = fn(s, *rows)
    except L.Conflict as e:
        raise ApiError(409, e.detail, headers={"Retry-After": str(e.retry_after)} if e.retry_after else None)
    s.commit()
    L.remove_artifacts(request.app.state.store, artifacts)
    return Response(status_code=204)


@router.delete("/v1/jobs/{job_id}", tags=["jobs"], **NO_CONTENT)
async def delete_job(job_id: str, request: Request, t: Tenant):
    """Delete a job with its metrics, module maps and checkpoints (rows and files). A queued or running job is
    canceled first: its worker stops the running step within seconds (worker/lease.py), and the request waits
    for that, without holding a server thread, for up to ``STOP_WAIT`` seconds; it answers 409 with Retry-After
    if the job is still running then. 409 while the model the job published exists (delete the model first).
    Concurrent DELETEs of one job: one answers 204, the others 404 (it is gone) or 409."""
    app = request.app
    if await run_in_threadpool(_request_stop, app, t, job_id):
        deadline = time.monotonic() + STOP_WAIT
        while not await run_in_threadpool(_stopped, app, job_id):
            if time.monotonic() > deadline:
                raise ApiError(409, f"job {job_id} was asked to cancel and its worker has not stopped yet; retry "
                                    f"the delete shortly", headers={"Retry-After": "2"})
            await asyncio.sleep(0.25)
    return await run_in_threadpool(_delete_job, request, t, job_id)


STOP_WAIT = 15.0  # seconds: a step stops within ~2 s of a cancel (worker/lease.py), a lost worker's job never does


def _request_stop(app, t: str, job_id: str) -> bool:
    """404 unless the tenant's; asks an active job to cancel: True when it has to stop first."""
    with app.state.db.session() as s:
        j = own_job(s, t, job_id)
        if j.status not in ACTIVE:
            return False
        request_cancel(s, job_id)
        return True


def _stopped(app, job_id: str) -> bool:
    with app.state.db.session() as s:
        status = s.scalar(select(Job.status).where(Job.id == job_id))
    return status is None or status not in ACTIVE


def _delete_job(request: Request, t: str, job_id: str) -> Response:
    with request.app.state.db.session() as s:
        # a write first: it locks the row (PostgreSQL) or the database (SQLite) until this transaction ends, so of
        # concurrent DELETEs one deletes and the others then find no row (404)
        claimed = s.execute(update(Job).where(Job.id == job_id, Job.tenant == t).values(updated_at=utcnow())
                            .execution_options(synchronize_session=False)).rowcount
        if not claimed:
            raise ApiError(404, f"job {job_id} not found")
        return _delete(request, s, L.delete_job, s.get(Job, job_id))


@router.delete("/v1/models/{model_id}", tags=["models"], **NO_CONTENT)
def delete_model(model_id: str, request: Request, s: Session, t: Tenant):
    """Delete a published model, its file, its adapters (rows and files) and its finished evaluations. 409 while
    an evaluation of it is queued or running (wait for it, or delete it first). The job that published it
    keeps its ``model_id`` as a record; the model answers 404 from now on."""
    out = _delete(request, s, L.delete_model, own_model(s, t, model_id))
    announce_eviction(request.app, "model", model_id)  # adapt processes drop it (and its adapters) at once
    return out


@router.delete("/v1/checkpoints/{ckpt_id}", tags=["jobs"], **NO_CONTENT)
def delete_checkpoint(ckpt_id: str, request: Request, s: Session, t: Tenant):
    """Delete one checkpoint (row and file). 409 while its job is queued or running (the worker resumes from,
    and writes, checkpoints). When it was the job's best checkpoint, the job's ``best_checkpoint_id`` is
    cleared; a model the job published is a file of its own and stays."""
    c = s.get(Checkpoint, ckpt_id)
    j = s.get(Job, c.job_id) if c is not None else None
    if j is None or j.tenant != t:
        raise ApiError(404, f"checkpoint {ckpt_id} not found")
    return _delete(request, s, L.delete_checkpoint, c, j)


@router.delete("/v1/datasets/{dataset_id}", tags=["datasets"], **NO_CONTENT)
def delete_dataset(dataset_id: str, request: Request, s: Session, t: Tenant):
    """Delete an uploaded dataset (row and file; frees its quota). 409 while a queued or running job trains on
    it, or while a model trained on it exists (its evaluations and adaptations load the dataset); the answer
    names them. A failed or canceled job that used it stays and fails on retry. A dataset still processing can
    be deleted: its worker finds the row gone and removes what it wrote."""
    return _delete(request, s, L.delete_dataset, own_dataset(s, t, dataset_id))


@router.delete("/v1/adapters/{adapter_id}", tags=["adapters"], **NO_CONTENT)
def delete_adapter(adapter_id: str, request: Request, s: Session, t: Tenant):
    """Delete a saved adapter (row and file); nothing depends on it."""
    out = _delete(request, s, L.delete_adapter, own_adapter(s, t, adapter_id))
    announce_eviction(request.app, "adapter", adapter_id)
    return out


@router.delete("/v1/evaluations/{eval_id}", tags=["evaluations"], **NO_CONTENT)
def delete_evaluation(eval_id: str, request: Request, s: Session, t: Tenant):
    """Delete an evaluation and its results; never 409. A queued one is never run; a running one stops at its
    next progress report (its worker finds the row gone and writes nothing more)."""
    e = s.get(Evaluation, eval_id)
    if e is None or e.tenant != t:
        raise ApiError(404, f"evaluation {eval_id} not found")
    return _delete(request, s, L.delete_evaluation, e)
