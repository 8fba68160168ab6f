"""Meta-training jobs: create (202, idempotent with ``Idempotency-Key``), list, read, cancel, retry, and their
metric series and sigma^2 module maps."""

from typing import Annotated, Optional

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from schemas import JobConfig
from schemas.api import JobCreated, JobOut, JobPage, MetricsOut, ModulesOut
from schemas.cost import estimate_job, human_bytes
from store import jobs as Q
from store.datasets import dataset_ids, quota_problem, tenant_usage
from store.models import Dataset, Job, JobMetric, ModuleMap, new_id, utcnow

from ..bodies import read_json
from ..deps import Cursor, Limit, Session, Tenant, own_job, page
from ..dispatch import enqueue, try_send
from ..errors import ApiError, json_body, unprocessable
from ..views import job_view, selection_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=202, response_model=JobCreated, openapi_extra=json_body(JobConfig))
async def create_job(request: Request, t: Tenant,
                     idempotency_key: Annotated[Optional[str], Header(max_length=128)] = None):
    cfg = (await read_json(request, request.app.state.settings.job_max_bytes, JobConfig,
                           object_msg="body must be a JSON object (a job config)")).model_dump(mode="json")
    return await run_in_threadpool(_create_job, request.app, t, cfg, idempotency_key)


def _create_job(app, t: str, cfg: dict, idem: Optional[str]):
    check_validation_split(cfg)
    check_world_size(cfg, app.state.settings)
    with app.state.db.session() as s:
        dims = check_datasets(s, t, cfg["tasks"])
        if idem:
            j = s.scalar(select(Job).where(Job.tenant == t, Job.idempotency_key == idem))
            if j is not None:
                return JSONResponse({"id": j.id, "status": j.status}, status_code=202)
        check_cost(s, t, cfg, dims, app.state.settings)
        check_active_jobs(s, t, app.state.settings)
        now = utcnow()
        j = Job(id=new_id("job"), tenant=t, kind="train", status="queued", config=cfg, step=0,
                total_steps=int(cfg["outer"]["steps"]), attempts=0, max_attempts=app.state.settings.max_attempts,
                cancel_requested=False, idempotency_key=idem, created_at=now, updated_at=now, enqueued_at=now)
        s.add(j)
        try:
            s.flush()
        except IntegrityError:
            s.rollback()
            j = s.scalar(select(Job).where(Job.tenant == t, Job.idempotency_key == idem))
            return JSONResponse({"id": j.id, "status": j.status}, status_code=202)
    try_send(enqueue, app, j.id)
    return {"id": j.id, "status": "queued"}


def check_cost(s, t: str, cfg: dict, dims: Optional[dict], settings) -> None:
    """422 when the job's estimated memory per meta-step, compute or checkpoint bytes (schemas/cost.py) is above the
    deployment's limit; the error names the estimate, the limit and the fields the estimate grows with. 507 when
    its checkpoints and model would bring the tenant's artifacts over its quota."""
    run = cfg["run"]
    keep = run.get("keep_checkpoints") or settings.keep_checkpoints
    cost = estimate_job({**cfg, "run": {**run, "keep_checkpoints": keep}}, dims)
    drivers = ", ".join(f"{'.'.join(p)}={v}" for p, v in cost.drivers if v is not None)
    for what, value, limit, env, show in (
            ("memory per meta-step", cost.memory_bytes, settings.job_max_memory_bytes, "JOB_MAX_MEMORY_BYTES",
             human_bytes),
            ("compute", cost.total_flops, settings.job_max_flops, "JOB_MAX_FLOPS", lambda v: f"{v:.3g} flops"),
            ("checkpoint storage", cost.checkpoint_bytes, settings.job_max_checkpoint_bytes,
             "JOB_MAX_CHECKPOINT_BYTES", human_bytes)):
        if value > limit:
            field = ["run", "keep_checkpoints"] if what == "checkpoint storage" else \
                ["outer", "steps"] if what == "compute" else list(cost.drivers[0][0])
            raise ApiError(422, f"estimated {what} {show(value)} is above this deployment's limit of {show(limit)} "
                                f"(METASHRINK_{env}); it grows with {drivers}"
                                + (", outer.steps" if what == "compute" else ""),
                           [{"loc": field, "msg": f"estimated {what} {show(value)} > limit {show(limit)}",
                             "type": "cost", "estimate": cost.as_dict()}])
    adding = cost.checkpoint_bytes + cost.model_bytes
    problem = quota_problem(tenant_usage(s, t) + adding, adding, settings.tenant_quota_bytes,
                            "this job's checkpoints and model (estimated)")
    if problem:
        raise ApiError(507, problem, [{"loc": ["run", "keep_checkpoints"], "msg": problem}])


def check_active_jobs(s, t: str, settings) -> None:
    """429 when the tenant already has ``tenant_max_active_jobs`` queued or running jobs."""
    n = s.scalar(select(func.count()).select_from(Job).where(Job.tenant == t, Job.status.in_(Q.ACTIVE)))
    if n >= settings.tenant_max_active_jobs:
        raise ApiError(429, f"tenant has {n} queued or running jobs, the most allowed "
                            f"(METASHRINK_TENANT_MAX_ACTIVE_JOBS); wait for one to finish or cancel one",
                       headers={"Retry-After": "30"})


def check_datasets(s, t: str, tasks: dict) -> Optional[dict]:
    """422 unless every dataset the tasks name is the tenant's, of the right kind and ready. Returns the shapes
    the cost estimate needs (``input_shape``, ``output_dim``) where the datasets' summaries give them."""
    want = "image_classes" if tasks.get("family") == "image_classes" else "regression"
    dims = None
    for did in dataset_ids(tasks):
        d = s.get(Dataset, did)
        if d is None or d.tenant != t:
            raise unprocessable(["tasks", "dataset_id"], f"dataset {did} not found")
        if d.kind != want:
            raise unprocessable(["tasks", "dataset_id"],
                                f"dataset {did} is a {d.kind} dataset; {tasks.get('family')} tasks need {want}")
        if d.status != "ready":
            why = "wait until it is ready (GET /v1/datasets/{id})" if d.status == "processing" else \
                f"it failed: {d.error}"
            raise unprocessable(["tasks", "dataset_id"], f"dataset {did} is {d.status}, not ready; {why}")
        summary = d.summary or {}
        if want == "regression" and summary.get("input_dim"):
            dims = {"input_shape": [summary["input_dim"]], "output_dim": summary.get("output_dim") or 1}
    return dims


def check_world_size(cfg: dict, settings) -> None:
    """422 when a multi-rank job asks for more ranks per node (execution.world_size / nodes) than a worker may
    launch (METASHRINK_MAX_WORLD_SIZE) or for more nodes than the deployment allows (METASHRINK_MAX_NODES). The
    devices of a worker's machine are checked by the worker that claims the job (the job fails naming them)."""
    ex = cfg["execution"]
    world, nodes = int(ex.get("world_size") or 1), int(ex.get("nodes") or 1)
    if nodes > settings.max_nodes:
        raise unprocessable(["execution", "nodes"], f"{nodes} nodes requested; this deployment runs a job on at "
                                                    f"most {settings.max_nodes} (METASHRINK_MAX_NODES)")
    if world // nodes > settings.max_world_size:
        raise unprocessable(["execution", "world_size"],
                            f"{world // nodes} ranks per node requested; a worker launches at most "
                            f"{settings.max_world_size} for one job (METASHRINK_MAX_WORLD_SIZE)")


def check_validation_split(cfg: dict) -> None:
    """422 when a job asks for validation (run.validate_every) but its task family has no ``val`` split:
    image_classes and uploaded regression datasets hold one out only with ``tasks.split.val_fraction > 0``
    (sinusoid, polynomial and hierarchical_normal draw fresh tasks for any split)."""
    if not cfg["run"].get("validate_every"):
        return
    tasks = cfg["tasks"]
    if tasks.get("family") in ("image_classes", "regression_dataset"):
        if not (tasks.get("split") or {}).get("val_fraction"):
            raise unprocessable(["tasks", "split", "val_fraction"],
                                f"run.validate_every needs a validation split: set tasks.split.val_fraction > 0 "
                                f"for {tasks.get('family')} tasks (it is 0)")


@router.get("", response_model=JobPage)
def list_jobs(s: Session, t: Tenant, limit: Limit = 20, cursor: Cursor = None,
              status: Optional[str] = Query(None, pattern="^(queued|running|succeeded|failed|canceled)$")):
    stmt = select(Job).where(Job.tenant == t)
    if status:
        stmt = stmt.where(Job.status == status)
    return page(s, stmt, Job, limit, cursor, job_view)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, s: Session, t: Tenant):
    return job_view(own_job(s, t, job_id), with_config=True)


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut)
def cancel_job(job_id: str, s: Session, t: Tenant):
    j = own_job(s, t, job_id)
    Q.request_cancel(s, job_id)
    s.commit()
    s.refresh(j)
    return job_view(j)


@router.post("/{job_id}/retry", status_code=202, response_model=JobOut)
def retry_job(job_id: str, request: Request, s: Session, t: Tenant):
    """Re-queue a failed or canceled job; it resumes from its latest checkpoint (409 otherwise)."""
    j = own_job(s, t, job_id)
    if not Q.retry(s, job_id):
        raise ApiError(409, f"job {job_id} is {j.status}; only failed or canceled jobs can be retried")
    s.commit()
    s.refresh(j)
    view = job_view(j)  # the state the retry made (queued): a worker may claim the job as soon as it is sent
    try_send(enqueue, request.app, job_id)
    return view


@router.get("/{job_id}/metrics", response_model=MetricsOut)
def job_metrics(job_id: str, s: Session, t: Tenant, name: Optional[str] = None):
    own_job(s, t, job_id)
    stmt = select(JobMetric.name, JobMetric.step, JobMetric.value).where(JobMetric.job_id == job_id)
    if name:
        stmt = stmt.where(JobMetric.name == name)
    series: dict = {}
    for n, st, v in s.execute(stmt.order_by(JobMetric.name, JobMetric.step)):
        series.setdefault(n, []).append([st, v])
    return {"series": series}


@router.get("/{job_id}/modules", response_model=ModulesOut)
def job_modules(job_id: str, s: Session, t: Tenant, step: Optional[int] = Query(None, ge=0)):
    job = own_job(s, t, job_id)
    steps = s.scalars(select(ModuleMap.step).where(ModuleMap.job_id == job_id).distinct()
                      .order_by(ModuleMap.step)).all()
    if not steps:
        raise ApiError(404, f"job {job_id} has no module map yet")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ApiError(404, f"no module map at step {step}; recorded steps: {steps}")
    rows = s.scalars(select(ModuleMap).where(ModuleMap.job_id == job_id, ModuleMap.step == step)
                     .order_by(ModuleMap.position)).all()
    modules = [{"name": r.module, "n_params": r.n_params, "sigma2": r.sigma2, "selected": r.selected} for r in rows]
    return {"step": step, "steps": steps, "modules": modules, "selection": selection_view(modules, job.config)}
