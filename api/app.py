"""The FastAPI application: every /v1 endpoint of the contract, /healthz, /readyz, /docs.

``create_app(settings)`` wires the database, the artifact store and a Celery app (used only to send job ids
and adapt requests). The reconciler runs as a background thread in this process (``settings.reconciler``).
"""

import base64
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Annotated, Optional

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi_offline import FastAPIOffline
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse
from pydantic import ValidationError
from sqlalchemy import and_, or_, select, text, update
from sqlalchemy.exc import IntegrityError

from schemas import JobConfig
from schemas.api import (AdaptOut, AdaptRequest, CheckpointList, EvaluationOut, EvaluationRequest, JobCreated, JobOut,
                         JobPage, MetricsOut, ModelOut, ModelPage, ModulesOut, PredictOut, PredictRequest)
from store import jobs as Q
from store.artifacts import make_store
from store.db import Database
from store.keys import hash_key
from store.datasets import dataset_ids, put_collection
from store.models import (Adapter, ApiKey, Checkpoint, Dataset, Evaluation, Job, JobMetric, MetaModelRow, ModuleMap, new_id,
                          utcnow)
from store.settings import Settings
from store.telemetry import ADAPT_LATENCY, ADAPT_REJECTED

from . import errors
from .errors import ApiError, install_openapi, json_body, pydantic_errors, unprocessable
from .metrics import install as install_metrics
from .metrics import workers_by_queue
from .validation import as_array, check_inputs, check_targets

log = logging.getLogger("metashrink.api")


# --------------------------------------------------------------------------- helpers
def encode_cursor(created_at: datetime, id_: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{id_}".encode()).decode()


def decode_cursor(cursor: str):
    try:
        ts, id_ = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(ts), id_
    except Exception:
        raise unprocessable(["query", "cursor"], "not a cursor returned by this API")


def paginate(stmt, model, limit: int, cursor: Optional[str]):
    if cursor:
        ts, id_ = decode_cursor(cursor)
        stmt = stmt.where(or_(model.created_at < ts, and_(model.created_at == ts, model.id < id_)))
    return stmt.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)


def job_view(j: Job, with_config: bool = False) -> dict:
    return {"id": j.id, "status": j.status, "progress": {"step": j.step, "total": j.total_steps},
            "metrics": j.metrics or {}, "error": {"message": j.error} if j.error else None,
            "model_id": j.model_id, "best_checkpoint_id": j.best_checkpoint_id, "attempts": j.attempts, "cancel_requested": j.cancel_requested,
            "created_at": j.created_at, "updated_at": j.updated_at, "config": j.config if with_config else None}


def selection_view(entries: list, config: dict) -> dict:
    """The ``selection`` object of a module map (``core.adapt.selection`` decided ``selected`` in the worker;
    this restates its inputs without importing torch): the largest gap in natural-log sigma^2 and whether the
    selected modules are a strict subset."""
    s2 = [e["sigma2"] for e in entries]
    if not entries or any(v is None or v <= 0 for v in s2):
        return {"method": "none", "gap": None, "min_gap": None, "separated": False}
    logs = sorted((math.log(v) for v in s2), reverse=True)
    mods = config.get("modules", {})
    n_sel = sum(1 for e in entries if e["selected"])
    return {"method": mods.get("selection", "gap"), "gap": max((a - b for a, b in zip(logs, logs[1:])), default=0.0),
            "min_gap": mods.get("min_gap", math.log(100.0)),  # configs stored before min_gap existed
            "separated": 0 < n_sel < len(entries)}


def model_view(m: MetaModelRow) -> dict:
    total = sum(r["n_params"] for r in m.module_map) or 1
    sel = [r["name"] for r in m.module_map if r["selected"]]
    share = sum(r["n_params"] for r in m.module_map if r["selected"]) / total
    return {"id": m.id, "job_id": m.job_id, "kind": m.kind, "input_shape": m.input_shape,
            "output_dim": m.output_dim, "config": m.config, "module_map": m.module_map, "selected_modules": sel,
            "selection": selection_view(m.module_map, m.config), "selected_share": share, "sha256": m.sha256,
            "bytes": m.bytes, "created_at": m.created_at}


def dataset_view(d: Dataset) -> dict:
    return {**d.summary, "id": d.id, "kind": d.kind, "name": d.name, "sha256": d.sha256, "bytes": d.bytes,
            "created_at": d.created_at.isoformat()}


async def read_capped(request: Request, cap: int) -> bytes:
    """The request body, refusing (413) one above ``cap`` bytes without reading all of it."""
    cl = request.headers.get("content-length")
    if cl and cl.isdigit() and int(cl) > cap:
        raise ApiError(413, f"request body of {cl} bytes is above the cap of {cap} bytes",
                       [{"loc": ["body"], "msg": f"above the cap of {cap} bytes"}])
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > cap:
            raise ApiError(413, f"request body is above the cap of {cap} bytes",
                           [{"loc": ["body"], "msg": f"above the cap of {cap} bytes"}])
        chunks.append(chunk)
    return b"".join(chunks)


async def read_json(request: Request, cap: int, schema, **kw):
    """A capped JSON body (413 above ``cap`` bytes) decoded and validated off the event loop (``parse_json``),
    so that large bodies never stall other requests."""
    return await run_in_threadpool(parse_json, await read_capped(request, cap), schema, **kw)


def parse_json(raw: bytes, schema, empty: bytes = b"null", object_msg: Optional[str] = None):
    """Decode a JSON body and validate it with a pydantic ``schema``; every failure is a 422 naming the field.
    ``object_msg``: refuse anything but a JSON object with that message."""
    too_deep = ApiError(422, "body is nested too deeply", [{"loc": ["body"], "msg": "nested too deeply"}])
    try:
        body = json.loads(raw or empty)
    except RecursionError:
        raise too_deep from None
    except ValueError as e:
        raise ApiError(422, f"body is not valid JSON: {e}", [{"loc": ["body"], "msg": str(e)}])
    if object_msg and not isinstance(body, dict):
        raise ApiError(422, object_msg, [{"loc": ["body"], "msg": "not an object"}])
    try:
        return schema.model_validate(body)
    except RecursionError:
        raise too_deep from None
    except ValidationError as e:
        errs = pydantic_errors(e)
        raise ApiError(422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs), errs)


class Reconciler(threading.Thread):
    """Sweeps every ``reconcile_interval`` seconds (``reconcile_once``). The first sweep after start-up and the
    first after the broker comes back re-send every queued job and evaluation, not only stale ones: messages
    sent while the broker was down, or lost with it, are delivered again (a duplicate is harmless: a claim is
    a conditional UPDATE)."""

    def __init__(self, app: FastAPI):
        super().__init__(daemon=True, name="metashrink-reconciler")
        self.app, self.stop = app, threading.Event()

    def run(self):
        st: Settings = self.app.state.settings
        resend_all = True
        while True:
            try:
                self.app.state.redis.ping()
            except Exception:
                resend_all = True  # the broker is down: sweep the database anyway, re-send everything after
            try:
                reconcile_once(self.app, resend_all)
                resend_all = False
            except Exception:
                log.exception("reconciler sweep failed")
            if self.stop.wait(st.reconcile_interval):
                return


def reconcile_once(app: FastAPI, resend_all: bool = False) -> list[str]:
    st: Settings = app.state.settings
    after = 0.0 if resend_all else st.requeue_queued_after
    with app.state.db.session() as s:
        if st.reap_local_leases and Q.expire_dead_local(s, socket.gethostname(), _alive):
            log.warning("reconciler: leases of dead local workers expired")
        ids = Q.reconcile(s, after)
    for job_id in ids:
        log.info("reconciler: (re-)enqueueing job %s", job_id)
        enqueue(app, job_id)
    with app.state.db.session() as s:
        evs = Q.reconcile_evaluations(s, after)
    for eval_id in evs:
        log.info("reconciler: (re-)enqueueing evaluation %s", eval_id)
        enqueue_evaluation(app, eval_id)
    return ids + evs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def enqueue_evaluation(app: FastAPI, eval_id: str):
    from worker.celery_app import RUN_EVALUATION, TRAIN_QUEUE
    app.state.celery.send_task(RUN_EVALUATION, args=[eval_id], queue=TRAIN_QUEUE)


def evaluation_view(e: Evaluation) -> dict:
    return {"id": e.id, "model_id": e.model_id, "status": e.status, "metric": e.metric, "results": e.results,
            "progress": {"done": e.done_tasks, "total": e.total_tasks},
            "error": {"message": e.error} if e.error else None, "request": e.request, "attempts": e.attempts,
            "created_at": e.created_at, "updated_at": e.updated_at, "finished_at": e.finished_at}


def enqueue(app: FastAPI, job_id: str):
    from worker.celery_app import RUN_JOB, TRAIN_QUEUE
    app.state.celery.send_task(RUN_JOB, args=[job_id], queue=TRAIN_QUEUE)


# --------------------------------------------------------------------------- app
def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rec = None
        if settings.reconciler:
            rec = Reconciler(app)
            rec.start()
        yield
        if rec is not None:
            rec.stop.set()

    app = FastAPIOffline(title="Metashrink", version="0.1.0", lifespan=lifespan,  # /docs, /redoc without a CDN
                  description="Modular meta-learning with shrinkage: meta-training jobs, sigma^2 module maps, "
                              "checkpoints and few-shot adaptation.")
    from worker.celery_app import make_celery
    from worker.redis_util import redis_client

    app.state.settings = settings
    app.state.db = Database(settings.database_url)
    app.state.store = make_store(settings)
    app.state.celery = make_celery(settings)
    app.state.redis = redis_client(settings.broker(), retry=False)
    app.state.key_cache = {}
    errors.install(app)

    # ------------------------------------------------------------------ dependencies
    def db_session():
        with app.state.db.session() as s:
            yield s

    def tenant(authorization: Annotated[Optional[str], Header()] = None) -> str:
        if not authorization or not authorization.lower().startswith("bearer "):
            raise ApiError(401, "missing bearer API key (Authorization: Bearer <key>)",
                           headers={"WWW-Authenticate": "Bearer"})
        h = hash_key(authorization[7:].strip())
        cache = app.state.key_cache
        hit = cache.get(h)
        if hit and hit[1] > time.monotonic():
            return hit[0]
        with app.state.db.session() as s:
            t = s.scalar(select(ApiKey.tenant).where(ApiKey.key_hash == h, ApiKey.revoked.is_(False)))
        if t is None:
            raise ApiError(401, "invalid API key", headers={"WWW-Authenticate": "Bearer"})
        cache[h] = (t, time.monotonic() + 30)
        return t

    Session = Annotated[object, Depends(db_session)]
    Tenant = Annotated[str, Depends(tenant)]

    def own_job(s, t: str, job_id: str) -> Job:
        j = s.get(Job, job_id)
        if j is None or j.tenant != t:
            raise ApiError(404, f"job {job_id} not found")
        return j

    def own_model(s, t: str, model_id: str) -> MetaModelRow:
        m = s.get(MetaModelRow, model_id)
        if m is None or m.tenant != t:
            raise ApiError(404, f"model {model_id} not found")
        return m

    Limit = Annotated[int, Query(ge=1, le=settings.page_limit_max)]

    # ------------------------------------------------------------------ health
    @app.get("/healthz", tags=["health"])
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz():
        checks = {}
        try:
            with app.state.db.engine.connect() as c:
                c.execute(text("SELECT 1"))
            checks["database"] = "ok"
        except Exception as e:
            checks["database"] = f"error: {type(e).__name__}"
        try:
            app.state.redis.ping()
            checks["broker"] = "ok"
        except Exception as e:
            checks["broker"] = f"error: {type(e).__name__}"
        from worker.celery_app import ADAPT_QUEUE, TRAIN_QUEUE
        workers = workers_by_queue(app) if checks["broker"] == "ok" else {}
        missing = [q for q in (TRAIN_QUEUE, ADAPT_QUEUE) if not workers.get(q)]
        checks["workers"] = f"error: no worker consumes {', '.join(missing)}" if missing else "ok"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks, "workers": workers},
                            status_code=200 if ok else 503)

    install_metrics(app)

    # ------------------------------------------------------------------ jobs
    @app.post("/v1/jobs", status_code=202, response_model=JobCreated, tags=["jobs"], openapi_extra=json_body(JobConfig))
    async def create_job(request: Request, t: Tenant,
                         idempotency_key: Annotated[Optional[str], Header(max_length=128)] = None):
        cfg = (await read_json(request, settings.job_max_bytes, JobConfig,
                               object_msg="body must be a JSON object (a job config)")).model_dump(mode="json")
        return await run_in_threadpool(_create_job, t, cfg, idempotency_key)

    def check_datasets(s, t: str, tasks: dict):
        want = "image_classes" if tasks.get("family") == "image_classes" else "regression"
        for did in dataset_ids(tasks):
            d = s.get(Dataset, did)
            if d is None or d.tenant != t:
                raise unprocessable(["tasks", "dataset_id"], f"dataset {did} not found")
            if d.kind != want:
                raise unprocessable(["tasks", "dataset_id"],
                                    f"dataset {did} is a {d.kind} dataset; {tasks.get('family')} tasks need {want}")

    def _create_job(t: str, cfg: dict, idem: Optional[str]):
        check_validation_split(cfg)
        with app.state.db.session() as s:
            check_datasets(s, t, cfg["tasks"])
            if idem:
                j = s.scalar(select(Job).where(Job.tenant == t, Job.idempotency_key == idem))
                if j is not None:
                    return JSONResponse({"id": j.id, "status": j.status}, status_code=202)
            now = utcnow()
            j = Job(id=new_id("job"), tenant=t, kind="train", status="queued", config=cfg, step=0,
                    total_steps=int(cfg["outer"]["steps"]), attempts=0, max_attempts=settings.max_attempts,
                    cancel_requested=False, idempotency_key=idem, created_at=now, updated_at=now, enqueued_at=now)
            s.add(j)
            try:
                s.flush()
            except IntegrityError:
                s.rollback()
                j = s.scalar(select(Job).where(Job.tenant == t, Job.idempotency_key == idem))
                return JSONResponse({"id": j.id, "status": j.status}, status_code=202)
        try:
            enqueue(app, j.id)
        except Exception:  # the reconciler re-sends it once the broker is back; the row is the truth
            log.exception("enqueue of job %s failed", j.id)
        return {"id": j.id, "status": "queued"}

    @app.get("/v1/jobs", response_model=JobPage, tags=["jobs"])
    def list_jobs(s: Session, t: Tenant, limit: Limit = 20, cursor: Optional[str] = None,
                  status: Optional[str] = Query(None, pattern="^(queued|running|succeeded|failed|canceled)$")):
        stmt = select(Job).where(Job.tenant == t)
        if status:
            stmt = stmt.where(Job.status == status)
        rows = s.scalars(paginate(stmt, Job, limit, cursor)).all()
        nxt = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
        return {"items": [job_view(j) for j in rows[:limit]], "next_cursor": nxt}

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
    def get_job(job_id: str, s: Session, t: Tenant):
        return job_view(own_job(s, t, job_id), with_config=True)

    @app.post("/v1/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, tags=["jobs"])
    def cancel_job(job_id: str, s: Session, t: Tenant):
        j = own_job(s, t, job_id)
        now = utcnow()
        s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                  .values(status="canceled", cancel_requested=True, updated_at=now, finished_at=now)
                  .execution_options(synchronize_session=False))
        s.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                  .values(cancel_requested=True, updated_at=now).execution_options(synchronize_session=False))
        s.commit()
        s.refresh(j)
        return job_view(j)

    @app.post("/v1/jobs/{job_id}/retry", status_code=202, response_model=JobOut, tags=["jobs"])
    def retry_job(job_id: str, s: Session, t: Tenant):
        """Re-queue a failed or canceled job; it resumes from its latest checkpoint (409 otherwise)."""
        j = own_job(s, t, job_id)
        if not Q.retry(s, job_id):
            raise ApiError(409, f"job {job_id} is {j.status}; only failed or canceled jobs can be retried")
        s.commit()
        try:
            enqueue(app, job_id)
        except Exception:  # the reconciler re-sends it once the broker is back
            log.exception("enqueue of job %s failed", job_id)
        s.refresh(j)
        return job_view(j)

    @app.get("/v1/jobs/{job_id}/metrics", response_model=MetricsOut, tags=["jobs"])
    def job_metrics(job_id: str, s: Session, t: Tenant, name: Optional[str] = None):
        own_job(s, t, job_id)
        stmt = select(JobMetric.name, JobMetric.step, JobMetric.value).where(JobMetric.job_id == job_id)
        if name:
            stmt = stmt.where(JobMetric.name == name)
        series: dict = {}
        for n, st, v in s.execute(stmt.order_by(JobMetric.name, JobMetric.step)):
            series.setdefault(n, []).append([st, v])
        return {"series": series}

    @app.get("/v1/jobs/{job_id}/modules", response_model=ModulesOut, tags=["jobs"])
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

    @app.get("/v1/jobs/{job_id}/checkpoints", response_model=CheckpointList, tags=["jobs"])
    def job_checkpoints(job_id: str, s: Session, t: Tenant):
        """Checkpoints in step order; ``val_score`` is the validation metric at that step (run.validate_every)
        and ``best`` marks the checkpoint with the best one (the meta-model a validated job publishes)."""
        j = own_job(s, t, job_id)
        rows = s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)).all()
        return {"items": [{"id": c.id, "step": c.step, "sha256": c.sha256, "bytes": c.bytes, "val_score": c.val_score,
                           "best": c.id == j.best_checkpoint_id} for c in rows],
                "best_checkpoint_id": j.best_checkpoint_id}

    @app.get("/v1/checkpoints/{ckpt_id}/file", tags=["jobs"], response_class=FileResponse)
    def checkpoint_file(ckpt_id: str, s: Session, t: Tenant):
        c = s.get(Checkpoint, ckpt_id)
        if c is None or s.get(Job, c.job_id).tenant != t:
            raise ApiError(404, f"checkpoint {ckpt_id} not found")
        path = app.state.store.path(c.uri)
        if not path.exists():
            raise ApiError(404, f"checkpoint {ckpt_id}: file missing from the artifact store")
        return FileResponse(path, media_type="application/octet-stream", filename=f"{ckpt_id}.safetensors",
                            headers={"X-Checksum-Sha256": c.sha256})

    # ------------------------------------------------------------------ datasets
    @app.post("/v1/datasets", status_code=201, tags=["datasets"],
              openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                  "type": "object", "required": ["file", "kind"], "properties": {
                      "file": {"type": "string", "format": "binary",
                               "description": "a zip of class folders, or a CSV/NPZ of regression points"},
                      "kind": {"type": "string", "enum": ["image_classes", "regression"]},
                      "name": {"type": "string"},
                      "min_per_class": {"type": "integer", "description": "images each class needs (image_classes)"},
                      "min_points": {"type": "integer", "description": "points each task needs (regression)"}}}}}}})
    async def upload_dataset(request: Request, t: Tenant):
        """Upload a meta-dataset (multipart: ``file``, ``kind``); validated, then stored as safetensors."""
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
        return await run_in_threadpool(_store_dataset, t, kind, str(name)[:256], fname, data, opts)

    def _store_dataset(t, kind, name, fname, data, opts):
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

    def own_dataset(s, t: str, dataset_id: str) -> Dataset:
        d = s.get(Dataset, dataset_id)
        if d is None or d.tenant != t:
            raise ApiError(404, f"dataset {dataset_id} not found")
        return d

    @app.get("/v1/datasets", tags=["datasets"])
    def list_datasets(s: Session, t: Tenant, limit: Limit = 20, cursor: Optional[str] = None):
        rows = s.scalars(paginate(select(Dataset).where(Dataset.tenant == t), Dataset, limit, cursor)).all()
        nxt = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
        return {"items": [dataset_view(d) for d in rows[:limit]], "next_cursor": nxt}

    @app.get("/v1/datasets/{dataset_id}", tags=["datasets"])
    def get_dataset(dataset_id: str, s: Session, t: Tenant):
        return dataset_view(own_dataset(s, t, dataset_id))

    # ------------------------------------------------------------------ models
    @app.get("/v1/models", response_model=ModelPage, tags=["models"])
    def list_models(s: Session, t: Tenant, limit: Limit = 20, cursor: Optional[str] = None):
        rows = s.scalars(paginate(select(MetaModelRow).where(MetaModelRow.tenant == t), MetaModelRow, limit,
                                  cursor)).all()
        nxt = encode_cursor(rows[limit - 1].created_at, rows[limit - 1].id) if len(rows) > limit else None
        return {"items": [model_view(m) for m in rows[:limit]], "next_cursor": nxt}

    @app.get("/v1/models/{model_id}", response_model=ModelOut, tags=["models"])
    def get_model(model_id: str, s: Session, t: Tenant):
        return model_view(own_model(s, t, model_id))

    @app.get("/v1/models/{model_id}/file", tags=["models"], response_class=FileResponse)
    def model_file(model_id: str, s: Session, t: Tenant):
        m = own_model(s, t, model_id)
        return FileResponse(app.state.store.path(m.uri), media_type="application/octet-stream",
                            filename=f"{model_id}.safetensors", headers={"X-Checksum-Sha256": m.sha256})

    @app.post("/v1/models/{model_id}/adapt", response_model=AdaptOut, tags=["models"],
              openapi_extra=json_body(AdaptRequest))
    async def adapt(model_id: str, request: Request, t: Tenant):
        req = await read_json(request, settings.adapt_max_bytes, AdaptRequest)
        m = await run_in_threadpool(_model_for, t, model_id)
        payload = validate_adapt(req, m, settings)
        payload.update(save_adapter=req.save_adapter, tenant=t)
        return await run_in_threadpool(_run_adapt, t, model_id, payload)

    @app.post("/v1/models/{model_id}/evaluations", status_code=202, tags=["evaluations"],
              openapi_extra=json_body(EvaluationRequest))
    async def create_evaluation(model_id: str, request: Request, t: Tenant):
        req = await read_json(request, 64 * 1024, EvaluationRequest, empty=b"{}",
                              object_msg="body: must be a JSON object")
        if max(req.steps) > settings.adapt_max_steps:
            raise unprocessable(["steps"], f"{max(req.steps)} is above the cap of {settings.adapt_max_steps} steps")
        return await run_in_threadpool(_create_evaluation, t, model_id, req)

    def _create_evaluation(t, model_id, req: EvaluationRequest):
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
        try:
            enqueue_evaluation(app, e.id)
        except Exception:
            log.exception("enqueue of evaluation %s failed", e.id)
        return JSONResponse({"id": e.id, "status": "queued"}, status_code=202)

    @app.get("/v1/evaluations/{eval_id}", response_model=EvaluationOut, tags=["evaluations"])
    def get_evaluation(eval_id: str, s: Session, t: Tenant):
        e = s.get(Evaluation, eval_id)
        if e is None or e.tenant != t:
            raise ApiError(404, f"evaluation {eval_id} not found")
        return evaluation_view(e)

    @app.get("/v1/models/{model_id}/evaluations", tags=["evaluations"])
    def list_evaluations(model_id: str, s: Session, t: Tenant):
        own_model(s, t, model_id)
        rows = s.scalars(select(Evaluation).where(Evaluation.model_id == model_id, Evaluation.tenant == t)
                         .order_by(Evaluation.created_at.desc(), Evaluation.id.desc()).limit(100)).all()
        return {"items": [evaluation_view(e) for e in rows]}

    def _model_for(t, model_id):
        with app.state.db.session() as s:
            m = own_model(s, t, model_id)
            s.expunge(m)
            return m

    def _send_and_wait(tenant: str, model_id: str, payload: dict, task: str, route: str):
        from redis.exceptions import RedisError

        from worker.celery_app import ADAPT_QUEUE
        from worker.redis_util import BLPOP_SLICE, reply_key

        r = app.state.redis
        slot = f"metashrink:adapt-inflight:{tenant}"
        unavailable = ApiError(503, "the broker is unavailable; retry shortly", headers={"Retry-After": "5"})
        try:
            n = r.incr(slot)
            r.expire(slot, int(settings.adapt_timeout) + 60)  # a crashed API process cannot hold slots forever
        except RedisError:
            raise unavailable from None
        try:
            if n > settings.adapt_tenant_concurrency:
                raise ApiError(429, f"{n - 1} adapt requests of this tenant are in flight (limit "
                                    f"{settings.adapt_tenant_concurrency}); retry when one has finished",
                               headers={"Retry-After": "1"})
            rid = uuid.uuid4().hex
            t0 = time.perf_counter()
            deadline = time.monotonic() + settings.adapt_timeout
            try:
                app.state.celery.send_task(task, args=[rid, model_id, payload], queue=ADAPT_QUEUE,
                                           expires=settings.adapt_timeout)
            except Exception:  # kombu's OperationalError and friends: the broker is down
                log.exception("adapt request %s: send failed", rid)
                raise unavailable from None
            got = None
            while got is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ApiError(504, f"no adapt worker answered within {settings.adapt_timeout:g} s")
                try:  # waits shorter than the client's socket timeout, looped until the deadline
                    got = r.blpop([reply_key(rid)], timeout=min(BLPOP_SLICE, max(left, 0.01)))
                except RedisError:
                    raise unavailable from None
        finally:
            try:
                r.decr(slot)
            except RedisError:
                pass
        ADAPT_LATENCY.labels(route).observe(time.perf_counter() - t0)
        return got

    def _run_adapt(tenant: str, model_id: str, payload: dict, task: str | None = None):
        """Send one adapt (or adapter predict) request to the adapt queue and wait for its reply until the
        request's deadline (``adapt_timeout``): 504 after it, 503 while the broker is unreachable, 429 when the
        tenant already has ``adapt_tenant_concurrency`` requests in flight. The message expires at the deadline,
        so a worker that reaches it late drops it instead of running work nobody waits for."""
        from worker.celery_app import ADAPT

        route = "adapt" if task is None else "adapter_predict"
        try:
            got = _send_and_wait(tenant, model_id, payload, task or ADAPT, route)
        except ApiError as e:
            if e.status in (429, 503, 504):
                ADAPT_REJECTED.labels(route, str(e.status)).inc()
            raise
        out = json.loads(got[1])
        if not out.pop("ok"):
            if out["status"] == 422:
                raise unprocessable(["body"], out["message"])
            raise ApiError(500, f"adaptation failed: {out['message']}")
        return out

    # ------------------------------------------------------------------ adapters
    def own_adapter(s, t: str, adapter_id: str) -> Adapter:
        a = s.get(Adapter, adapter_id)
        if a is None or a.tenant != t:
            raise ApiError(404, f"adapter {adapter_id} not found")
        return a

    @app.get("/v1/adapters/{adapter_id}", tags=["adapters"])
    def get_adapter(adapter_id: str, s: Session, t: Tenant):
        a = own_adapter(s, t, adapter_id)
        return {"id": a.id, "model_id": a.model_id, "modules": a.modules, "steps": a.steps, "bytes": a.bytes,
                "sha256": a.sha256, "created_at": a.created_at}

    @app.post("/v1/adapters/{adapter_id}/predict", response_model=PredictOut, tags=["adapters"],
              openapi_extra=json_body(PredictRequest))
    async def adapter_predict(adapter_id: str, request: Request, t: Tenant):
        from worker.celery_app import ADAPTER_PREDICT
        req = await read_json(request, settings.adapt_max_bytes, PredictRequest)

        def lookup():
            with app.state.db.session() as s:
                a = own_adapter(s, t, adapter_id)
                m = s.get(MetaModelRow, a.model_id)
                s.expunge(m)
                return m
        m = await run_in_threadpool(lookup)
        if len(req.x) > settings.adapt_max_rows:
            raise unprocessable(["x"], f"{len(req.x)} rows is above the cap of {settings.adapt_max_rows} rows")
        x = check_inputs(as_array(req.x, "x"), "x", tuple(m.input_shape))
        return await run_in_threadpool(_run_adapt, t, adapter_id, {"x": x.tolist()}, ADAPTER_PREDICT)

    # ------------------------------------------------------------------ live views: SSE events, dashboard
    from .live import install as install_live
    install_live(app, tenant)
    install_openapi(app, (JobConfig, AdaptRequest, EvaluationRequest, PredictRequest), _errors_for)
    return app


BODY_ROUTES = {("/v1/jobs", "post"), ("/v1/models/{model_id}/adapt", "post"), ("/v1/datasets", "post"),
               ("/v1/models/{model_id}/evaluations", "post"), ("/v1/adapters/{adapter_id}/predict", "post")}
ADAPT_ROUTES = {("/v1/models/{model_id}/adapt", "post"), ("/v1/adapters/{adapter_id}/predict", "post")}


def _errors_for(path: str, method: str, op: dict) -> set:
    """The error statuses an operation can answer (documented as problem+json in the OpenAPI document)."""
    codes = set()
    if path.startswith("/v1/"):
        codes.add(401)
        if "{" in path:
            codes.add(404)
        if op.get("parameters") or op.get("requestBody"):
            codes.add(422)
    if (path, method) in BODY_ROUTES:
        codes |= {413, 422}
    if (path, method) in ADAPT_ROUTES:
        codes |= {429, 503, 504}
    if path.endswith("/retry"):
        codes.add(409)
    if path == "/readyz":
        codes.add(503)
    return codes


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


def validate_adapt(req: AdaptRequest, m: MetaModelRow, settings: Settings) -> dict:
    if req.steps > settings.adapt_max_steps:
        raise unprocessable(["steps"], f"{req.steps} is above the cap of {settings.adapt_max_steps} steps")
    names = [r["name"] for r in m.module_map]
    if isinstance(req.modules, list):
        if not req.modules:
            raise unprocessable(["modules"], "an empty list adapts nothing; use steps 0 for unadapted predictions")
        unknown = [x for x in req.modules if x not in names]
        if unknown:
            raise unprocessable(["modules"], f"unknown modules {unknown}; this model's modules are {names}")
    cap = settings.adapt_max_rows
    for field, v in (("support.x", req.support.x), ("support.y", req.support.y), ("query.x", req.query.x)):
        if len(v) > cap:
            raise unprocessable(field.split("."), f"{len(v)} rows is above the cap of {cap} rows")
    cls = m.kind == "classification"
    xs = check_inputs(as_array(req.support.x, "support.x"), "support.x", tuple(m.input_shape))
    ys = check_targets(as_array(req.support.y, "support.y", integer=cls), "support.y", m.kind, m.output_dim,
                       xs.shape[0])
    xq = check_inputs(as_array(req.query.x, "query.x"), "query.x", tuple(m.input_shape))
    return {"support": {"x": xs.tolist(), "y": ys.tolist()}, "query": {"x": xq.tolist()}, "steps": req.steps,
            "modules": req.modules}
