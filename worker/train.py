"""A training job: one attempt at a claimed job, as named steps.

``claim`` takes the job's lease and ``load`` reads the job (``run_job``, worker/tasks.py, does both); ``train``
runs the attempt in this process: a world-size-1 job, or rank 0 of a multi-rank job (worker/ranks.py launches the
ranks and rank 0 calls ``train`` with a ``core.distributed.Comm``). ``TrainingRun.run`` reads top-down::

    build -> resume -> start -> (step -> validate -> record: checkpoint, module map, heartbeat)* -> publish

Rank 0 alone heartbeats, writes metrics, checkpoints, validates and publishes. A heartbeat that finds the lease
gone raises LeaseLost (the attempt stops and writes nothing more); one that finds the job canceled ends it.
torch and core/ are imported inside the steps: the worker's parent process imports this module and stays torch-free.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import and_, delete, insert, select, update

from store import jobs as Q
from store.models import Checkpoint, Job, JobMetric, MetaModelRow, ModuleMap, new_id, utcnow
from store.preprocessing import model_preprocessing
from store.telemetry import META_STEPS

from .lease import LeaseKeeper, LeaseLost, StepInterrupted
from .runtime import Runtime, finite, public_error, use_datasets
from .validation import Validation

log = logging.getLogger("metashrink.worker")


class LatestCheckpoint(NamedTuple):
    uri: str
    sha256: str
    step: int


@dataclass
class ClaimedJob:
    """What an attempt needs of the job's row, read once after the claim."""

    id: str
    owner: str  # this attempt's lease owner
    config: dict
    tenant: str
    claimed_at: datetime | None  # this attempt's claim (Q.claim)
    attempt: int
    checkpoint: LatestCheckpoint | None  # the attempt resumes from it

    @property
    def world_size(self) -> int:
        return int(self.config["execution"].get("world_size") or 1)


def claim(rt: Runtime, job_id: str, owner: str) -> bool:
    """Take the job's lease; False for a duplicate delivery, a finished job, or one leased elsewhere."""
    with rt.db.session() as ses:
        if Q.claim(ses, job_id, owner, rt.settings.lease_seconds):
            return True
    log.info("job %s: not claimed (duplicate delivery, finished, or leased elsewhere)", job_id)
    return False


def load(rt: Runtime, job_id: str, owner: str) -> ClaimedJob:
    with rt.db.session() as ses:
        job = ses.get(Job, job_id)
        ck = Q.latest_checkpoint(ses, job_id)
        return ClaimedJob(job_id, owner, job.config, job.tenant, job.started_at, job.attempts,
                          LatestCheckpoint(ck.uri, ck.sha256, ck.step) if ck else None)


def train(rt: Runtime, job: ClaimedJob, comm=None, hard_exit: bool = False) -> str:
    """Run the attempt (with ``comm`` as rank 0 of a multi-rank job): "succeeded" or "canceled"; LeaseLost when
    another worker took the job meanwhile. ``LeaseKeeper`` watches every meta-step: it keeps the lease, and stops
    the step on a cancel, past METASHRINK_STEP_TIMEOUT, or when this process's resident memory grows by more than
    METASHRINK_JOB_MAX_MEMORY_BYTES over what it held when the attempt started (``hard_exit``: see LeaseKeeper)."""
    st = rt.settings
    keeper = LeaseKeeper(rt, job.id, job.owner, st.lease_seconds, max_step_s=st.step_timeout,
                         max_growth=st.job_max_memory_bytes, hard_exit=hard_exit)
    try:
        return TrainingRun(rt, job, keeper, comm).run()
    finally:
        keeper.close()


def release(rt: Runtime, job_id: str, owner: str) -> None:
    """Hand the job back now rather than when its lease expires (the reconciler's next sweep re-sends it)."""
    log.warning("job %s: terminated; released to the queue", job_id)
    with rt.db.session() as ses:
        Q.release(ses, job_id, owner)


def fail(rt: Runtime, job_id: str, owner: str, e: Exception) -> str:
    """A failure a person can act on (the config or the data, not the infrastructure): the job fails with the
    error as the API shows it. Called from an ``except`` block (the traceback is logged)."""
    log.exception("job %s failed", job_id)
    with rt.db.session() as ses:
        Q.finish(ses, job_id, owner, "failed", error=public_error(rt, e))
    return "failed"


class TrainingRun:
    """One attempt's training loop; ``run`` is the whole of it, each step a method below it."""

    def __init__(self, rt: Runtime, job: ClaimedJob, keeper: LeaseKeeper, comm=None):
        self.rt, self.job, self.keeper, self.comm = rt, job, keeper, comm
        self.lease = rt.settings.lease_seconds
        self.run_cfg = job.config["run"]
        self.trainer = None
        self.val: Validation | None = None
        self.steps_run = None  # the meta-steps counter of the job's algorithm (store/telemetry.py)
        self.t_build = 0.0
        # time to the first step, the compile decision and compile time of this attempt: the job's ``startup``
        self.startup: dict = {}
        self.written_startup: dict | None = None  # the startup as the job's row holds it
        self.pending: list = []  # (step, metrics) for the next heartbeat to write
        self.latest: dict | None = None  # the latest metrics, shown with the job
        self.latest_val: dict = {}
        self.last_beat = time.monotonic()
        self.stop = False  # validation's patience ran out: publish now

    def run(self) -> str:
        self.build()
        self.resume()
        if self.start():
            return self.cancel()
        self.last_beat = time.monotonic()
        self.stop = self.val is not None and self.val.exhausted()  # resumed after the patience ran out
        while self.trainer.step_count < self.trainer.total_steps and not self.stop:
            try:
                metrics = self.step()
            except StepInterrupted as e:
                if e.cancel:
                    return self.cancel()
                raise  # a limit: the job fails with the reason (run_job)
            validated, score = self.validate()
            if self.record(metrics, validated, score):
                return self.cancel()
        return self.publish()

    # --------------------------------------------------------------------------- before the first step
    def build(self) -> None:
        """The trainer for the job's config (its uploaded datasets made loadable here) and its validation."""
        from core import MetaTrainer

        cfg = self.job.config
        self.t_build = time.monotonic()
        if cfg["execution"].get("compile"):
            # every job's trainer compiles new closures of the same code; Dynamo keeps at most 8 compiled variants of
            # one code object per process and runs it uncompiled past that, so each job starts from a clean Dynamo
            # state (the compiled code itself comes back from the on-disk cache in seconds)
            import torch
            torch._dynamo.reset()
        use_datasets(self.rt, self.job.tenant, cfg["tasks"])
        threads = self.rt.settings.task_threads or len(os.sched_getaffinity(0))
        self.trainer = MetaTrainer(cfg, comm=self.comm, task_threads=threads)
        self.val = Validation(self.trainer, cfg) if self.run_cfg.get("validate_every") else None
        self.steps_run = META_STEPS.labels(cfg["algorithm"]["name"])

    def resume(self) -> None:
        """The trainer's state from the job's latest checkpoint, when it has one."""
        ck = self.job.checkpoint
        if ck is None:
            return
        tensors, meta = self.rt.store.get_tensors(ck.uri, sha256=ck.sha256)
        self.trainer.load_state_dict(tensors, meta)
        log.info("job %s: resumed from checkpoint at step %d", self.job.id, ck.step)

    def start(self) -> bool:
        """The attempt's first heartbeat (building the trainer may take a while) with its startup record; the
        rows after the checkpoint resumed from are forgotten and the validations before it replayed; the other
        ranks take this state. True when the job was canceled meanwhile."""
        job, trainer = self.job, self.trainer
        resumed_from = job.checkpoint.step if job.checkpoint else None
        self.startup = {"attempt": job.attempt, "host": socket.gethostname(), "resumed_from_step": resumed_from,
                        "build_s": round(time.monotonic() - self.t_build, 3), "time_to_first_step_s": None,
                        "first_step_s": None, "compile": dict(trainer.compile_info)}
        with self.rt.db.session() as ses:
            cancel = self.heartbeat(ses)
            Q.forget_after(ses, job.id, -1 if resumed_from is None else resumed_from)
            if self.val is not None:  # the validations before the checkpoint we resume from (none on a fresh start)
                # the validation series (checkpoints beyond the retention are gone; the best one is kept)
                self.val.restore(ses.execute(
                    select(JobMetric.step, JobMetric.value, Checkpoint.id)
                    .outerjoin(Checkpoint, and_(Checkpoint.job_id == JobMetric.job_id, Checkpoint.step == JobMetric.step))
                    .where(JobMetric.job_id == job.id, JobMetric.name == self.val.series)).all(), trainer.family.kind)
                self.set_best(ses, self.val.best_checkpoint_id)
        if self.comm is not None:  # the other ranks take this (fresh or resumed) state before the first step
            self.comm.sync_state(trainer)
        return cancel

    # --------------------------------------------------------------------------- one meta-step
    def step(self) -> dict:
        """One meta-step, the lease kept meanwhile; the first one's timings and a compile decision go in the
        startup record. The step's metrics are queued for the next heartbeat and returned."""
        t_step = time.monotonic()
        m = self.keeper.run_step(self.trainer.step)  # the lease kept, cancel and limits watched meanwhile
        self.steps_run.inc()
        if self.startup["first_step_s"] is None:  # this attempt's first step
            self.startup["first_step_s"] = round(time.monotonic() - t_step, 3)
            if self.job.claimed_at is not None:
                self.startup["time_to_first_step_s"] = round((utcnow() - self.job.claimed_at).total_seconds(), 3)
        if self.trainer.compile_info != self.startup["compile"]:  # execution.compile "auto" decided, or a compile
            self.startup["compile"] = dict(self.trainer.compile_info)  # timed out
        self.pending.append((self.trainer.step_count, m))
        return m

    def validate(self) -> tuple[bool, float | None]:
        """(True, score) when a validation is due at this step (score None when not finite), else (False, None).
        Its own generator: the training RNG stream is untouched. Sets ``stop`` when the patience runs out."""
        step, val = self.trainer.step_count, self.val
        if val is None or not val.due(step, step == self.trainer.total_steps):
            return False, None
        score = finite(val.score())
        self.pending.append((step, {val.series: score}))
        self.latest_val = {val.series: score}
        self.stop = val.patience is not None and not val.improves(score) and val.bad + 1 >= val.patience
        return True, score

    def record(self, metrics: dict, validated: bool, score: float | None) -> bool:
        """What is due at this step in one transaction: the heartbeat (with the queued metrics), the module map,
        the checkpoint, the best checkpoint. True when the job was canceled meanwhile."""
        step, run = self.trainer.step_count, self.run_cfg
        last = step == self.trainer.total_steps
        self.latest = {**{k: finite(v) for k, v in metrics.items()}, **self.latest_val}
        do_map = last or self.stop or step % run["module_map_every"] == 0
        do_ckpt = last or validated or step % run["checkpoint_every"] == 0
        if not (do_map or do_ckpt or self.beat_due(step)):
            return False
        ckpt_id = new_id("ckpt")
        ckpt = self.checkpoint(step) if do_ckpt else None
        with self.rt.db.session() as ses:
            cancel = self.heartbeat(ses)
            if do_map:
                self.write_module_map(ses, step)
            if ckpt is not None:
                art, meta = ckpt
                ses.add(Checkpoint(id=ckpt_id, job_id=self.job.id, step=step, uri=art.uri, sha256=art.sha256,
                                   bytes=art.bytes, meta=meta, val_score=score))
                Q.made_progress(ses, self.job.id, self.job.owner)
            best = self.val.best_checkpoint_id if self.val is not None else None
            if validated and self.val.improves(score):
                self.set_best(ses, ckpt_id)
                best = ckpt_id
            pruned = self.prune(ses, best) if ckpt is not None else []
        for uri in pruned:  # after the commit: a failure in between leaves an orphan file, never a row without one
            self.rt.store.delete(uri)
        if validated:
            self.val.record(step, score, ckpt_id)
        return cancel

    def prune(self, ses, best: str | None) -> list:
        """Retention: the checkpoint rows beyond the latest ``keep_checkpoints`` (the job's, else the deployment's),
        except the best validated one, deleted; their files' uris returned."""
        keep = self.run_cfg.get("keep_checkpoints") or self.rt.settings.keep_checkpoints
        ses.flush()
        old = ses.execute(select(Checkpoint.id, Checkpoint.uri).where(Checkpoint.job_id == self.job.id)
                          .order_by(Checkpoint.step.desc()).offset(keep)).all()
        old = [(cid, uri) for cid, uri in old if cid != best]
        if old:
            ses.execute(delete(Checkpoint).where(Checkpoint.id.in_([cid for cid, _ in old])))
        return [uri for _, uri in old]

    def beat_due(self, step: int) -> bool:
        return (step % self.run_cfg["log_every"] == 0 or self.startup != self.written_startup
                or time.monotonic() - self.last_beat > self.lease / 3)

    def checkpoint(self, step: int):
        """The trainer's state as an artifact (written before the transaction that records it; an orphan file is
        harmless): (artifact, meta)."""
        tensors, meta = self.trainer.state_dict()
        key = f"jobs/{self.job.id}/ckpt-{step:09d}-{uuid.uuid4().hex[:6]}.safetensors"
        return self.rt.store.put_tensors(key, tensors, meta), meta

    # --------------------------------------------------------------------------- rows
    def heartbeat(self, ses) -> bool:
        """Renew the lease (LeaseLost when it is gone) with the step, the latest metrics and a changed startup
        record, and write the queued metrics. True when the job was canceled."""
        job = self.job
        new_startup = self.startup if self.startup != self.written_startup else None
        ok, cancel = Q.heartbeat(ses, job.id, job.owner, self.lease, self.trainer.step_count, self.latest,
                                 startup=new_startup)
        if not ok:
            raise LeaseLost()
        self.keeper.beaten()
        if new_startup is not None:
            self.written_startup = json.loads(json.dumps(new_startup))
        if self.pending:
            ses.execute(insert(JobMetric), [{"job_id": job.id, "step": st, "name": k, "value": finite(v)}
                                            for st, m in self.pending for k, v in m.items()])
            self.pending.clear()
        self.last_beat = time.monotonic()
        return cancel

    def write_module_map(self, ses, step: int) -> None:
        ses.execute(insert(ModuleMap), [
            {"job_id": self.job.id, "step": step, "position": i, "module": r["name"], "n_params": r["n_params"],
             "sigma2": r["sigma2"], "selected": r["selected"]} for i, r in enumerate(self.trainer.module_map())])

    def set_best(self, ses, checkpoint_id: str | None) -> None:
        ses.execute(update(Job).where(Job.id == self.job.id, Job.lease_owner == self.job.owner)
                    .values(best_checkpoint_id=checkpoint_id).execution_options(synchronize_session=False))

    # --------------------------------------------------------------------------- the end
    def cancel(self) -> str:
        with self.rt.db.session() as ses:
            Q.finish(ses, self.job.id, self.job.owner, "canceled")
        return "canceled"

    def publish(self) -> str:
        """The meta-model as a model artifact and row, the job succeeded: the best validated checkpoint's
        meta-model when validation chose one, else the last step's."""
        job, trainer = self.job, self.trainer
        final_step = trainer.step_count
        source = {"step": final_step}
        if self.val is not None and self.val.best_checkpoint_id is not None:
            source = self.load_best()
        mm = trainer.meta_model()
        model_id = new_id("mdl")
        # safetensors files come back with sorted keys, and core's partition follows dict order: keep the order
        art = self.rt.store.put_tensors(f"models/{model_id}.safetensors", mm.tensors(),
                                        {"job_id": job.id, "order": list(mm.tensors()), "source": source})
        with self.rt.db.session() as ses:
            if not Q.finish(ses, job.id, job.owner, "succeeded", model_id=model_id, step=final_step):
                raise LeaseLost()
            pre, _ = model_preprocessing(ses, job.tenant, job.config, mm.input_shape)  # image models: inputs
            ses.add(MetaModelRow(id=model_id, tenant=ses.get(Job, job.id).tenant, job_id=job.id, config=job.config,
                                 kind=mm.kind, input_shape=list(mm.input_shape), output_dim=mm.output_dim,
                                 module_map=mm.module_map(), uri=art.uri, sha256=art.sha256, bytes=art.bytes,
                                 preprocessing=pre))
        return "succeeded"

    def load_best(self) -> dict:
        """The trainer's state from the best validated checkpoint; where the published meta-model comes from."""
        with self.rt.db.session() as ses:
            best = ses.get(Checkpoint, self.val.best_checkpoint_id)
            uri, sha, source = best.uri, best.sha256, {"step": best.step, "checkpoint_id": best.id,
                                                       "val_score": best.val_score}
        tensors, meta = self.rt.store.get_tensors(uri, sha256=sha)
        self.trainer.load_state_dict(tensors, meta)
        return source
