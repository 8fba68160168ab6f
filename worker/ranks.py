"""A multi-rank job (``execution.world_size`` > 1): the claiming worker launches the ranks and supervises them.

- ``supervise`` runs in the train worker's pool child that claimed the job (and holds its lease). It hosts the
  rendezvous (a ``torch.distributed.TCPStore`` on a free port; ranks join it with
  ``init_process_group(store=...)``: gloo on CPU, NCCL on CUDA with one GPU per rank), starts one process per
  rank (``python -m worker.ranks SPEC RANK``, each dying with this process), keeps the lease while they start
  and polls them. It never enters a collective, so it sees any rank's death at once.
- Rank 0 runs the ordinary training loop (``worker.tasks._train`` with a ``core.distributed.Comm``): it alone
  heartbeats, writes metrics, checkpoints, validates and publishes, under the launcher's lease owner. The other
  ranks build the same trainer, take rank 0's state and meta-step when rank 0 says so (``core.distributed.follow``);
  they never touch the job's rows.
- A rank that dies (any signal, any exit that is not a clean finish) fails the *attempt*: the launcher kills the
  other ranks and expires the lease (``store.jobs.abandon``); the reconciler's next sweep re-queues the job, which
  resumes from its latest checkpoint (``max_attempts`` still bounds attempts that checkpoint nothing). A failure
  rank 0 can attribute to the job itself (a bad config or data, as in a world-size-1 job) fails the job.

Single node: ``execution.nodes`` > 1 is refused by the API unless METASHRINK_MAX_NODES allows it, and this
launcher does not start ranks on other machines yet (see README, "Multi-device jobs").
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from functools import partial
from pathlib import Path

log = logging.getLogger("metashrink.worker")
ROOT = Path(__file__).resolve().parent.parent

ATTEMPT_FAILED = 3   # a rank's exit code: a collective failed (another rank died); the attempt, not the job
GRACE = 5.0          # seconds rank 0 gets to finish on its own once another rank has died or the lease is gone


def world_of(cfg: dict) -> tuple[int, int]:
    ex = cfg["execution"]
    return int(ex.get("world_size") or 1), int(ex.get("nodes") or 1)


def rank_device(cfg: dict, local_rank: int) -> str:
    import torch
    dev = cfg["execution"]["device"]
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{local_rank}" if dev == "cuda" else "cpu"


def check_resources(cfg: dict, settings) -> None:
    """What the worker can tell and the API cannot: the devices on this machine (ValueError: the job fails with
    this message, as for any config the worker cannot run)."""
    world, nodes = world_of(cfg)
    per_node = world // nodes
    if nodes > 1:
        raise ValueError(f"execution.nodes = {nodes}: this worker launches the ranks of a job on its own machine "
                         f"only; multi-node jobs are not supported yet")
    if per_node > settings.max_world_size:
        raise ValueError(f"execution.world_size = {world} exceeds this worker's METASHRINK_MAX_WORLD_SIZE "
                         f"({settings.max_world_size})")
    if rank_device(cfg, 0).startswith("cuda"):
        import torch
        n = torch.cuda.device_count()
        if per_node > n:
            raise ValueError(f"execution.world_size = {world} needs {per_node} GPUs (one per rank) on the worker's "
                             f"machine; it has {n}")


# --------------------------------------------------------------------------- the launcher (pool child)
def supervise(rt, job_id: str, owner: str, cfg: dict, tenant: str) -> str:
    """Launch the job's ranks on this machine and wait for them. Returns the outcome as ``run_job`` does
    ("succeeded", "failed", "canceled", "lease-lost", or "attempt-failed")."""
    import datetime

    import torch.distributed as dist

    from store import jobs as Q

    from .embedded import die_with_parent

    s = rt.settings
    check_resources(cfg, s)
    world, _ = world_of(cfg)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=s.dist_timeout))
    tmp = Path(tempfile.mkdtemp(prefix=f"metashrink-{job_id}-"))
    spec = {"job_id": job_id, "owner": owner, "tenant": tenant, "config": cfg, "world_size": world,
            "store_host": "127.0.0.1", "store_port": store.port, "prefix": f"{job_id}/{uuid.uuid4().hex[:8]}",
            "timeout": s.dist_timeout, "dir": str(tmp)}
    (tmp / "spec.json").write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs: list[subprocess.Popen] = []
    try:
        for r in range(world):
            procs.append(subprocess.Popen([sys.executable, "-m", "worker.ranks", str(tmp / "spec.json"), str(r)],
                                          cwd=str(ROOT), env=env, preexec_fn=partial(die_with_parent, os.getpid())))
        log.info("job %s: %d ranks started (pids %s), rendezvous 127.0.0.1:%d", job_id, world,
                 [p.pid for p in procs], store.port)
        outcome = _wait(rt, Q, job_id, owner, procs, tmp)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait for anything
                pass
        del store
        shutil.rmtree(tmp, ignore_errors=True)
    if outcome == "attempt-failed":
        with rt.db.session() as ses:
            Q.abandon(ses, job_id, owner)
        log.warning("job %s: a rank was lost; the attempt failed and the job resumes from its latest checkpoint",
                    job_id)
    return outcome


def _wait(rt, Q, job_id, owner, procs, tmp: Path) -> str:
    s = rt.settings
    ready = tmp / "ready"
    every = s.lease_seconds / 3
    last = time.monotonic()
    deadline = None  # set once a rank died or the lease is gone: rank 0 gets GRACE seconds to finish
    why = None
    while True:
        codes = [p.poll() for p in procs]
        if codes[0] is not None:
            result = _result(tmp)
            if codes[0] == 0 and result:
                # the other ranks were told to stop; give them a moment to leave the group
                end = time.monotonic() + GRACE
                while any(p.poll() is None for p in procs[1:]) and time.monotonic() < end:
                    time.sleep(0.05)
                return result
            log.warning("job %s: rank 0 %s", job_id, _describe(codes[0]) if codes[0] else "exited without a result")
            return "attempt-failed"
        dead = [(r, c) for r, c in enumerate(codes) if c]  # a rank that exits 0 was told to stop by rank 0
        if dead and deadline is None:
            why = ", ".join(f"rank {r} {_describe(c)}" for r, c in dead)
            log.warning("job %s: %s", job_id, why)
            deadline = time.monotonic() + GRACE
        if time.monotonic() - last > every:
            last = time.monotonic()
            with rt.db.session() as ses:
                # while the ranks start, the launcher keeps the lease; then rank 0's heartbeats do
                ours = Q.owns(ses, job_id, owner) if ready.exists() else Q.renew(ses, job_id, owner, s.lease_seconds)
            if not ours and deadline is None:
                log.warning("job %s: the lease is no longer ours", job_id)
                why, deadline = "lease lost", time.monotonic() + GRACE
        if deadline is not None and time.monotonic() > deadline:
            return "lease-lost" if why == "lease lost" else "attempt-failed"
        time.sleep(0.1)


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _result(tmp: Path) -> str | None:
    try:
        return (tmp / "result").read_text().strip() or None
    except OSError:
        return None


# --------------------------------------------------------------------------- a rank (its own process)
def _rank0(rt, spec: dict, comm) -> str:
    """``run_job``'s handling around ``_train``, with rank 0 of the group."""
    from store import jobs as Q

    from .tasks import LeaseLost, _train
    job_id, owner = spec["job_id"], spec["owner"]
    try:
        return _train(rt, job_id, owner, comm=comm)
    except LeaseLost:
        log.warning("job %s: lease lost; stopping", job_id)
        return "lease-lost"
    except Exception as e:
        from core.distributed import RankLost
        if isinstance(e, RankLost):
            raise
        log.exception("job %s failed", job_id)
        from . import tasks
        public = getattr(tasks, "_public", lambda rt, e: f"{type(e).__name__}: {e}")  # run_job's message
        with rt.db.session() as ses:
            Q.finish(ses, job_id, owner, "failed", error=public(rt, e))
        return "failed"
    finally:
        comm.stop()


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    rank = int(argv[1])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"[%(asctime)s: %(levelname)s/rank {rank} of {spec['job_id']}] %(message)s")
    import torch

    from core import MetaTrainer
    from core.distributed import Comm, RankLost, follow

    from .tasks import runtime, use_datasets
    rt = runtime()
    if rt.settings.torch_threads:
        torch.set_num_threads(rt.settings.torch_threads)
    cfg, world = spec["config"], int(spec["world_size"])
    tmp = Path(spec["dir"])
    try:
        comm = Comm.join(spec["store_host"], spec["store_port"], rank, world, device=rank_device(cfg, rank),
                         prefix=spec["prefix"], timeout=float(spec["timeout"]),
                         ready_path=str(tmp / "ready") if rank == 0 else None)
        try:
            if rank == 0:
                outcome = _rank0(rt, spec, comm)
            else:
                use_datasets(rt, spec["tenant"], cfg["tasks"])
                steps = follow(MetaTrainer(cfg, comm=comm))
                outcome = f"followed {steps} steps"
        finally:
            Comm.leave()
    except RankLost as e:
        log.warning("%s", e)
        return ATTEMPT_FAILED
    if rank == 0:
        (tmp / "result.tmp").write_text(outcome)
        os.replace(tmp / "result.tmp", tmp / "result")
    log.info("done: %s", outcome)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
