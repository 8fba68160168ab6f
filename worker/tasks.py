"""Celery tasks: ``run_job`` (queue train) and ``adapt`` (queue adapt).

torch and core/ are imported inside the task bodies, i.e. in the prefork child process only.

An adapt request's deadline travels as its message's expiry (the API sends it with ``expires=adapt_timeout``):
Celery drops a message that expired before it started, and ``adapt`` stops an adaptation still running when the
deadline passes (checked at every inner step), so work the caller has stopped waiting for (it got its 504) never
holds the adapt worker beyond it.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager

from celery.signals import worker_process_init
from celery.utils.time import maybe_iso8601
from pydantic_core import to_json
from sqlalchemy import insert, select, update

from store import jobs as Q
from store.artifacts import MissingArtifact, make_store, public_message
from store.db import Database
from store.datasets import dataset_ids, get_collection
from store.models import (Adapter, Checkpoint, Dataset, Evaluation, Job, JobMetric, MetaModelRow, ModuleMap,
                          new_id, utcnow)
from store.telemetry import META_STEPS

from .celery_app import ADAPT, ADAPTER_PREDICT, ADAPTERS_PREDICT, RUN_EVALUATION, RUN_JOB, app
from .redis_util import redis_client, reply_key
from .resident import NotFound, Resident
from .validation import Validation
from .wire import unpack

log = logging.getLogger("metashrink.worker")


class LeaseLost(Exception):
    """Another worker owns the job now (our lease expired): stop without writing anything more."""


class DeadlinePassed(Exception):
    """The adapt request's deadline passed mid-adaptation: the caller has had its 504, nobody waits for a reply."""


class _Runtime:
    """Per-process resources (created after fork)."""

    def __init__(self):
        self.settings = app.conf.metashrink_settings
        # torch.compile's caches (Inductor's FX graph cache, AOTAutograd's, the compile records of
        # core.compile_cache) in the data directory: a later job of the same shape, in this process, another
        # worker process of this host or after a restart, loads the compiled code instead of compiling it. Only
        # the environment variable is set (torch reads it at every compile; nothing imports torch here), and the
        # ranks of a multi-rank job inherit it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.settings.compile_cache_path())
        self.db = Database(self.settings.database_url)
        self.store = make_store(self.settings)
        self.redis = redis_client(self.settings.broker())
        self.datasets: OrderedDict = OrderedDict()  # dataset id -> validated collection (small LRU)
        self._resident: Resident | None = None

    @property
    def resident(self) -> Resident:
        """Meta-models and adapters kept between requests (worker/resident.py), created at first use."""
        if self._resident is None:
            s = self.settings
            self._resident = Resident(self, s.adapt_cache_models, s.adapt_cache_adapters, s.adapt_cache_adapter_bytes)
        return self._resident

    def build_model(self, cfg: dict, uri: str, sha: str, tenant: str):
        """A MetaModel from its artifact (sha256 checked), on this worker's adapt device."""
        from core import MetaModel
        from core.trainer import resolve_device
        use_datasets(self, tenant, cfg["tasks"])
        tensors, meta = self.store.get_tensors(uri, sha256=sha)
        return MetaModel.from_tensors(cfg, ordered_tensors(tensors, meta), device=resolve_device(self.settings.adapt_device))


_rt: _Runtime | None = None
_rt_pid: int | None = None


def runtime() -> _Runtime:
    global _rt, _rt_pid
    if _rt is None or _rt_pid != os.getpid():
        _rt, _rt_pid = _Runtime(), os.getpid()
    return _rt


@worker_process_init.connect
def _child_init(**_):
    from .embedded import die_with_parent
    die_with_parent()  # a pool child never outlives its worker (a SIGKILLed worker leaves no consumer behind)
    threads = app.conf.metashrink_settings.torch_threads
    if threads:
        import torch
        torch.set_num_threads(threads)


def use_datasets(rt: _Runtime, tenant: str, tasks_cfg: dict) -> None:
    """Make the uploaded datasets a config names loadable in this process: ``import datasets`` registers the
    ``omniglot`` and ``dataset`` sources with core.tasks, and each id resolves, through the database, to the
    collection the job's tenant uploaded (another tenant's id is "not found")."""
    import datasets

    for did in dataset_ids(tasks_cfg):
        with rt.db.session() as ses:
            row = ses.scalar(select(Dataset).where(Dataset.id == did, Dataset.tenant == tenant))
            if row is None:
                raise ValueError(f"dataset {did} not found (datasets belong to the tenant that uploaded them)")
            uri, sha = row.uri, row.sha256

        def load(did=did, uri=uri, sha=sha):
            if did in rt.datasets:
                rt.datasets.move_to_end(did)
                return rt.datasets[did]
            coll = get_collection(rt.store, uri, sha256=sha)
            rt.datasets[did] = coll
            while len(rt.datasets) > 4:
                rt.datasets.popitem(last=False)
            return coll

        datasets.register_dataset(did, load)


def _public(rt: _Runtime, e: BaseException) -> str:
    """The error as the API shows it (job and evaluation errors, adapt 500s): no path of this server in it."""
    from datasets.omniglot import default_directory
    code = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return public_message(e, (os.path.abspath(rt.settings.data_dir), str(rt.store.root), code,
                              str(default_directory())))


def _finite(v):
    v = float(v)
    return v if math.isfinite(v) else None


# --------------------------------------------------------------------------- training
class _LeaseKeeper:
    """Renews a job's lease from a thread while one meta-step runs for longer than a third of the lease (the
    training loop beats between steps only, and a step that compiles takes a minute or more on a cold cache:
    longer than the lease, which would hand the job to another worker mid-compile). It renews nothing while no
    step runs, or once one step has run for ``max_step_s`` (a hung step then loses its lease as before)."""

    def __init__(self, rt: _Runtime, job_id: str, owner: str, lease_seconds: float, max_step_s: float = 3 * 3600.0):
        self.rt, self.job_id, self.owner, self.lease = rt, job_id, owner, lease_seconds
        self.max_step_s = max_step_s
        self.busy_since: float | None = None
        self.renewed_at = time.monotonic()
        self.lost = False
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metashrink-lease", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.lease / 6):
            since, now = self.busy_since, time.monotonic()
            if since is None or now - self.renewed_at < self.lease / 3 or now - since > self.max_step_s:
                continue
            try:
                with self.rt.db.session() as ses:
                    ok = Q.renew(ses, self.job_id, self.owner, self.lease)
            except Exception:  # the database is away for a moment: the next tick tries again
                log.warning("job %s: lease renewal during a long step failed", self.job_id, exc_info=True)
                continue
            self.renewed_at = time.monotonic()
            self.renewals += 1
            if not ok:
                self.lost = True

    @contextmanager
    def step(self):
        self.busy_since = time.monotonic()
        try:
            yield
        finally:
            self.busy_since = None
        if self.lost:
            raise LeaseLost()

    def beaten(self):
        """The training loop renewed the lease itself."""
        self.renewed_at = time.monotonic()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str):
    rt = runtime()
    s = rt.settings
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with rt.db.session() as ses:
        if not Q.claim(ses, job_id, owner, s.lease_seconds):
            log.info("job %s: not claimed (duplicate delivery, finished, or leased elsewhere)", job_id)
            return "skipped"
    try:
        return _train(rt, job_id, owner)
    except SystemExit:  # billiard's SIGTERM handler in pool children: a shutdown, or Celery cancelling the task
        # after losing the broker. Hand the job back now rather than when its lease expires (re-sent by the
        # reconciler's next sweep).
        log.warning("job %s: terminated; released to the queue", job_id)
        with rt.db.session() as ses:
            Q.release(ses, job_id, owner)
        raise
    except LeaseLost:
        log.warning("job %s: lease lost; stopping", job_id)
        return "lease-lost"
    except Exception as e:  # a failure a person can act on: the config or the data, not the infrastructure
        log.exception("job %s failed", job_id)
        with rt.db.session() as ses:
            Q.finish(ses, job_id, owner, "failed", error=_public(rt, e))
        return "failed"


def _train(rt: _Runtime, job_id: str, owner: str, comm=None):
    """Train the job; with ``comm`` as rank 0 of a multi-rank job (worker/ranks.py), which this launches when
    the config asks for execution.world_size > 1."""
    keeper = _LeaseKeeper(rt, job_id, owner, rt.settings.lease_seconds)
    try:
        return _train_job(rt, job_id, owner, comm, keeper)
    finally:
        keeper.close()


def _train_job(rt: _Runtime, job_id: str, owner: str, comm, keeper: _LeaseKeeper):
    from core import MetaTrainer

    s = rt.settings
    with rt.db.session() as ses:
        job = ses.get(Job, job_id)
        cfg, tenant = job.config, job.tenant
        claimed_at, attempt = job.started_at, job.attempts  # this attempt's claim (Q.claim)
        ck = Q.latest_checkpoint(ses, job_id)
        ck = (ck.uri, ck.sha256, ck.step) if ck else None
    if comm is None and int(cfg["execution"].get("world_size") or 1) > 1:
        from .ranks import supervise
        return supervise(rt, job_id, owner, cfg, tenant)
    t_build = time.monotonic()
    if cfg["execution"].get("compile"):
        # every job's trainer compiles new closures of the same code; Dynamo keeps at most 8 compiled variants of
        # one code object per process and runs it uncompiled past that, so each job starts from a clean Dynamo
        # state (the compiled code itself comes back from the on-disk cache in seconds)
        import torch
        torch._dynamo.reset()
    use_datasets(rt, tenant, cfg["tasks"])
    trainer = MetaTrainer(cfg, comm=comm, task_threads=rt.settings.task_threads or len(os.sched_getaffinity(0)))
    if ck is not None:
        tensors, meta = rt.store.get_tensors(ck[0], sha256=ck[1])
        trainer.load_state_dict(tensors, meta)
        log.info("job %s: resumed from checkpoint at step %d", job_id, ck[2])
    # time to the first step, the compile decision and compile time of this attempt: the job's ``startup``
    startup = {"attempt": attempt, "host": socket.gethostname(), "resumed_from_step": ck[2] if ck else None,
               "build_s": round(time.monotonic() - t_build, 3), "time_to_first_step_s": None,
               "first_step_s": None, "compile": dict(trainer.compile_info)}
    written_startup: dict | None = None
    run = cfg["run"]
    val = Validation(trainer, cfg) if run.get("validate_every") else None
    with rt.db.session() as ses:  # renew the lease (building the trainer may take a while) and tidy up
        ok, cancel = Q.heartbeat(ses, job_id, owner, s.lease_seconds, trainer.step_count, None, startup=startup)
        if not ok:
            raise LeaseLost()
        written_startup = json.loads(json.dumps(startup))
        Q.forget_after(ses, job_id, ck[2] if ck else -1)
        if val is not None:  # the validations before the checkpoint we resume from (none on a fresh start)
            val.restore(ses.execute(select(Checkpoint.step, Checkpoint.val_score, Checkpoint.id)
                                    .where(Checkpoint.job_id == job_id)).all(), trainer.family.kind)
            ses.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner)
                        .values(best_checkpoint_id=val.best_checkpoint_id)
                        .execution_options(synchronize_session=False))
    if comm is not None:  # the other ranks take this (fresh or resumed) state before the first step
        comm.sync_state(trainer)
    if cancel:
        with rt.db.session() as ses:
            Q.finish(ses, job_id, owner, "canceled")
        return "canceled"

    total = trainer.total_steps
    pending: list = []
    latest: dict | None = None
    latest_val: dict = {}
    last_beat = time.monotonic()

    def beat(ses):
        nonlocal last_beat, written_startup
        new_startup = startup if startup != written_startup else None
        ok, cancel = Q.heartbeat(ses, job_id, owner, s.lease_seconds, trainer.step_count, latest,
                                 startup=new_startup)
        if not ok:
            raise LeaseLost()
        keeper.beaten()
        if new_startup is not None:
            written_startup = json.loads(json.dumps(new_startup))
        if pending:
            ses.execute(insert(JobMetric), [{"job_id": job_id, "step": st, "name": k, "value": _finite(v)}
                                            for st, m in pending for k, v in m.items()])
            pending.clear()
        last_beat = time.monotonic()
        return cancel

    stop = val is not None and val.exhausted()  # resumed after the patience ran out: publish now
    steps_run = META_STEPS.labels(cfg["algorithm"]["name"])
    first = True
    while trainer.step_count < total and not stop:
        t_step = time.monotonic()
        with keeper.step():  # renews the lease while a step runs long (a compile)
            m = trainer.step()
        steps_run.inc()
        step = trainer.step_count
        if first:
            first = False
            startup["first_step_s"] = round(time.monotonic() - t_step, 3)
            if claimed_at is not None:
                startup["time_to_first_step_s"] = round((utcnow() - claimed_at).total_seconds(), 3)
        if trainer.compile_info != startup["compile"]:  # execution.compile "auto" decided, or a compile timed
            startup["compile"] = dict(trainer.compile_info)
        pending.append((step, m))
        last = step == total
        score = None
        do_val = val is not None and val.due(step, last)
        if do_val:  # its own generator: the training RNG stream is untouched
            score = _finite(val.score())
            pending.append((step, {val.series: score}))
            latest_val = {val.series: score}
            stop = val.patience is not None and not val.improves(score) and val.bad + 1 >= val.patience
        latest = {**{k: _finite(v) for k, v in m.items()}, **latest_val}
        do_map = last or stop or step % run["module_map_every"] == 0
        do_ckpt = last or do_val or step % run["checkpoint_every"] == 0
        do_beat = (do_map or do_ckpt or step % run["log_every"] == 0 or startup != written_startup
                   or time.monotonic() - last_beat > s.lease_seconds / 3)
        if not do_beat:
            continue
        art, ckpt_id = None, new_id("ckpt")
        if do_ckpt:  # written before the transaction that records it; an orphan file is harmless
            tensors, meta = trainer.state_dict()
            art = rt.store.put_tensors(f"jobs/{job_id}/ckpt-{step:09d}-{uuid.uuid4().hex[:6]}.safetensors",
                                       tensors, meta)
        with rt.db.session() as ses:
            cancel = beat(ses)
            if do_map:
                ses.execute(insert(ModuleMap), [
                    {"job_id": job_id, "step": step, "position": i, "module": r["name"],
                     "n_params": r["n_params"], "sigma2": r["sigma2"], "selected": r["selected"]}
                    for i, r in enumerate(trainer.module_map())])
            if art is not None:
                ses.add(Checkpoint(id=ckpt_id, job_id=job_id, step=step, uri=art.uri, sha256=art.sha256,
                                   bytes=art.bytes, meta=meta, val_score=score))
                Q.made_progress(ses, job_id, owner)
            if do_val and val.improves(score):
                ses.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner)
                            .values(best_checkpoint_id=ckpt_id).execution_options(synchronize_session=False))
        if do_val:
            val.record(step, score, ckpt_id)
        if cancel:
            with rt.db.session() as ses:
                Q.finish(ses, job_id, owner, "canceled")
            return "canceled"

    final_step = trainer.step_count
    source = {"step": final_step}
    if val is not None and val.best_checkpoint_id is not None:  # publish the best meta-model, not the last
        with rt.db.session() as ses:
            best = ses.get(Checkpoint, val.best_checkpoint_id)
            uri, sha, source = best.uri, best.sha256, {"step": best.step, "checkpoint_id": best.id,
                                                       "val_score": best.val_score}
        tensors, meta = rt.store.get_tensors(uri, sha256=sha)
        trainer.load_state_dict(tensors, meta)
    mm = trainer.meta_model()
    model_id = new_id("mdl")
    # safetensors files come back with sorted keys, and core's partition follows dict order: keep the order
    art = rt.store.put_tensors(f"models/{model_id}.safetensors", mm.tensors(),
                               {"job_id": job_id, "order": list(mm.tensors()), "source": source})
    from store.preprocessing import model_preprocessing
    with rt.db.session() as ses:
        if not Q.finish(ses, job_id, owner, "succeeded", model_id=model_id, step=final_step):
            raise LeaseLost()
        pre, _ = model_preprocessing(ses, tenant, cfg, mm.input_shape)  # image models: how inputs are made
        ses.add(MetaModelRow(id=model_id, tenant=ses.get(Job, job_id).tenant, job_id=job_id, config=cfg,
                             kind=mm.kind, input_shape=list(mm.input_shape), output_dim=mm.output_dim,
                             module_map=mm.module_map(), uri=art.uri, sha256=art.sha256, bytes=art.bytes,
                             preprocessing=pre))
    return "succeeded"


# --------------------------------------------------------------------------- evaluation
@app.task(name=RUN_EVALUATION, acks_late=True, reject_on_worker_lost=True)
def run_evaluation(eval_id: str):
    """Meta-test evaluation of a published model (core.evaluation.evaluate); the results go in its row."""
    rt = runtime()
    s = rt.settings
    owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    with rt.db.session() as ses:
        if not Q.claim_evaluation(ses, eval_id, owner, s.lease_seconds):
            log.info("evaluation %s: not claimed (duplicate delivery, finished, or leased elsewhere)", eval_id)
            return "skipped"
        ev = ses.get(Evaluation, eval_id)
        model_id, req = ev.model_id, dict(ev.request)
    try:
        from core.evaluation import evaluate

        mm = _load_model(rt, model_id)
        last = [time.monotonic()]

        def progress(done, total):
            if time.monotonic() - last[0] < min(2.0, s.lease_seconds / 3) and done < total:
                return
            last[0] = time.monotonic()
            with rt.db.session() as ses:
                if not Q.evaluation_progress(ses, eval_id, owner, s.lease_seconds, done):
                    raise LeaseLost()

        r = evaluate(mm, n_tasks=req["n_tasks"], steps=req["steps"], modules=req["modules"], split=req["split"],
                     seed=req.get("seed", 0), progress=progress)
        results = [{"step": x["step"], "modules": x["modules"], "adapted": x.get("adapted"),
                    "mean": _finite(x["mean"]), "ci95": _finite(x["ci95"]), "std": _finite(x.get("std", float("nan"))),
                    "n": x.get("n"), "diverged": x["diverged"]} for x in r["results"]]
        with rt.db.session() as ses:
            Q.finish_evaluation(ses, eval_id, owner, "succeeded", metric=r["metric"], results=results,
                                done_tasks=req["n_tasks"])
        return "succeeded"
    except LeaseLost:
        log.warning("evaluation %s: lease lost; stopping", eval_id)
        return "lease-lost"
    except Exception as e:
        log.exception("evaluation %s failed", eval_id)
        with rt.db.session() as ses:
            Q.finish_evaluation(ses, eval_id, owner, "failed", error=_public(rt, e))
        return "failed"


# --------------------------------------------------------------------------- adaptation
def _load_model(rt: _Runtime, model_id: str, sha256: str | None = None):
    """The meta-model, resident in this process after its first use (``Resident.model``)."""
    return rt.resident.model(model_id, sha256)


def ordered_tensors(tensors: dict, meta: dict) -> dict:
    """Restore the parameter order recorded at publish time (MetaModel.from_tensors builds its module
    partition from the dict order; safetensors returns keys sorted)."""
    order = meta.get("order") or list(tensors)
    return {k: tensors[k] for k in order}


def _reply(rt: _Runtime, request_id: str, what: str, work) -> None:
    """Run ``work() -> dict`` and push its reply on the Redis list the waiting API pops: ``ok`` and a newline
    before the answer's JSON, which the API sends on as it is (``api.dispatch.run_adapt``); a JSON object with
    ``"ok": false`` for an error: a ValueError (bad input the core rejected) becomes a 422 message, a missing
    artifact file a 410, anything else a logged 500."""
    try:
        # pydantic_core's encoder: the same JSON as json.dumps (floats round-trip), ~10x faster on long float lists
        out = b"ok\n" + to_json(work(), inf_nan_mode="null")
    except DeadlinePassed as e:
        log.warning("%s %s cut at its deadline (%s); no reply", what, request_id, e)
        return
    except ValueError as e:
        out = {"ok": False, "status": 422, "message": str(e), **({"loc": e.loc} if hasattr(e, "loc") else {})}
    except NotFound as e:  # the model or adapter was deleted while the request was on its way: 404
        out = {"ok": False, "status": 404, "message": str(e)}
    except MissingArtifact as e:  # the model's or adapter's file is gone: 410, naming the artifact, not a path
        log.warning("%s %s: %s", what, request_id, e)
        out = {"ok": False, "status": 410, "message": str(e)}
    except Exception as e:
        log.exception("%s %s failed", what, request_id)
        out = {"ok": False, "status": 500, "message": _public(rt, e)}
    key = reply_key(request_id)
    pipe = rt.redis.pipeline(transaction=False)  # one round trip; nothing reads the list between the two
    pipe.rpush(key, out if isinstance(out, bytes) else json.dumps(out))
    pipe.expire(key, 300)
    pipe.execute()


def _predictions(pred) -> list:
    """Finite predictions, or a ValueError (422): a forward pass that overflows is the input's magnitude."""
    import torch
    if not bool(torch.isfinite(pred).all()):
        raise ValueError("the model's output is not finite for these query inputs (their magnitude makes the "
                         "model overflow)")
    return pred.double().cpu().tolist()


def _deadline_check(expires):
    """An ``interrupt`` callback for ``MetaModel.adapt`` that raises DeadlinePassed once the message's expiry
    (``self.request.expires``: an ISO 8601 string or a datetime; None without one) has passed."""
    if not expires:
        return None
    deadline = maybe_iso8601(expires).timestamp()

    def check(step):
        if time.time() > deadline:
            raise DeadlinePassed(f"after {step} steps")
    return check


@app.task(name=ADAPT, bind=True, acks_late=True, reject_on_worker_lost=True)
def adapt(self, request_id: str, model_id: str, payload: dict):
    """Adapt a meta-model to one support set and predict the queries; the reply goes on a Redis list that
    the waiting API pops. Cut, without a reply, when the request's deadline passes."""
    rt = runtime()
    payload = unpack(payload)

    def work():
        from datasets.images import payload_inputs
        payload_inputs(payload)  # image files (multipart requests) -> arrays, preprocessed as in training
        mm = _load_model(rt, model_id, payload.get("model_sha256"))
        res = mm.adapt(payload["support"]["x"], payload["support"]["y"], steps=payload["steps"],
                       modules=payload["modules"], interrupt=_deadline_check(self.request.expires))
        out = {"predictions": _predictions(mm.predict(payload["query"]["x"], res.params)),
               "adapted_modules": res.adapted_modules, "loss_curve": res.loss_curve,
               "diverged_at_step": res.diverged_at_step, "adapter_id": None}
        if payload.get("save_adapter"):
            out["adapter_id"] = _save_adapter(rt, model_id, mm, res, payload)
        return out

    _reply(rt, request_id, "adapt", work)


def _save_adapter(rt: _Runtime, model_id: str, mm, res, payload: dict) -> str:
    """Store only the adapted task-specific tensors (``AdaptResult.adapter``) as a small safetensors file."""
    tensors = res.adapter(mm.partition)
    aid = new_id("adp")
    art = rt.store.put_tensors(f"adapters/{aid}.safetensors", tensors,
                               {"model_id": model_id, "modules": res.adapted_modules, "order": list(tensors)})
    with rt.db.session() as ses:
        ses.add(Adapter(id=aid, tenant=payload["tenant"], model_id=model_id, modules=list(res.adapted_modules),
                        steps=int(payload["steps"]), uri=art.uri, sha256=art.sha256, bytes=art.bytes))
    return aid


@app.task(name=ADAPTER_PREDICT, acks_late=True, reject_on_worker_lost=True)
def adapter_predict(request_id: str, adapter_id: str, payload: dict):
    """Predict with a stored adapter: the model's phi with the adapter's tensors in place of the adapted ones."""
    rt = runtime()
    payload = unpack(payload)

    def work():
        from datasets.images import payload_inputs
        payload_inputs(payload)  # image files (multipart requests) -> arrays, preprocessed as in training
        mm, tensors = _adapter(rt, adapter_id, payload)
        return {"predictions": _predictions(mm.predict(payload["x"], {**mm.phi, **tensors}))}

    _reply(rt, request_id, "adapter predict", work)


def _adapter(rt: _Runtime, adapter_id: str, item: dict):
    """(meta-model, adapter tensors) of a predict request: from memory when the shas the API sent match what this
    process holds; else the adapter's row (404 when it is gone) and files."""
    if "model_id" not in item:  # a message sent before the API named the model (rolling upgrade)
        with rt.db.session() as ses:
            row = ses.get(Adapter, adapter_id)
            if row is None:
                raise NotFound(f"adapter {adapter_id} not found")
            item = {**item, "model_id": row.model_id}
    mm = _load_model(rt, item["model_id"], item.get("model_sha256"))
    return mm, rt.resident.adapter(adapter_id, item.get("adapter_sha256"), mm)


@app.task(name=ADAPTERS_PREDICT, acks_late=True, reject_on_worker_lost=True)
def adapters_predict(request_id: str, payload: dict):
    """Predict with many stored adapters at once (``POST /v1/adapters/predict``): the items are grouped by model
    and each group runs as few forwards as its query shapes allow (``MetaModel.predict_many``: one vmap over the
    adapters whose queries have the same number of rows). The answer keeps the request's order."""
    rt = runtime()
    payload = unpack(payload)

    def work():
        items = payload["items"]
        groups: dict = {}
        for i, it in enumerate(items):
            groups.setdefault(it["model_id"], []).append(i)
        out = [None] * len(items)
        for idx in groups.values():
            pairs = [_adapter(rt, items[i]["adapter_id"], items[i]) for i in idx]
            mm = pairs[0][0]
            preds = mm.predict_many([items[i]["x"] for i in idx], [t for _, t in pairs])
            for i, p in zip(idx, preds):
                try:
                    out[i] = _predictions(p)
                except ValueError as e:
                    e.loc = ["items", i, "x"]
                    raise
        return {"items": [{"adapter_id": it["adapter_id"], "predictions": p} for it, p in zip(items, out)]}

    _reply(rt, request_id, "adapters predict", work)
