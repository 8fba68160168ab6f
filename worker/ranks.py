"""A multi-rank job (``execution.world_size`` > 1): the claiming worker launches the ranks and supervises them.

- ``supervise`` runs in the train worker's pool child that claimed the job (and holds its lease). It hosts the
  rendezvous (a ``torch.distributed.TCPStore`` on a free port; ranks join it with
  ``init_process_group(store=...)``: gloo on CPU, NCCL on CUDA with one GPU per rank), starts one process per
  local rank (``python -m worker.ranks SPEC RANK``, each dying with this process), keeps the lease while they
  start and polls them. It never enters a collective, so it sees any rank's death at once.
- Rank 0 runs the ordinary training loop (``worker.train.train`` with a ``core.distributed.Comm``): it alone
  heartbeats, writes metrics, checkpoints, validates and publishes, under the launcher's lease owner. The other
  ranks build the same trainer, take rank 0's state and meta-step when rank 0 says so (``core.distributed.follow``);
  they never touch the job's rows.
- A rank that dies (any signal, any exit that is not a clean finish) fails the *attempt*: the launcher kills the
  other ranks and expires the lease (``store.jobs.abandon``); the reconciler's next sweep re-queues the job, which
  resumes from its latest checkpoint (``max_attempts`` still bounds attempts that checkpoint nothing). A failure
  rank 0 can attribute to the job itself (a bad config or data, as in a world-size-1 job) fails the job.

Several nodes (``execution.nodes`` = N > 1): the claiming worker is node 0 and the rendezvous host (the TCPStore
listens on every interface; other machines reach it at METASHRINK_RENDEZVOUS_HOST, default the host name). It
sends N - 1 ``join_job`` messages on the ``join`` queue, consumed by a join worker on every machine (a process of
its own, so a join never waits behind training). A joiner registers its machine in the store (one node per
METASHRINK_NODE_NAME per job: a second message reaching the same machine is handed on to another one), takes the
next node number k, starts global ranks k * per_node ... (k + 1) * per_node - 1 (local devices 0..per_node-1) and
supervises them as the claimant does, beating a counter in the store every half second. The claimant fails the
attempt when the nodes have not all joined within METASHRINK_JOIN_TIMEOUT, when a joiner reports a dead rank,
or when a joiner's beat stops for NODE_TIMEOUT (a lost machine sends no TCP reset, so the collectives alone
would wait for METASHRINK_DIST_TIMEOUT); a joiner kills its ranks when the claimant's store closes or says the
attempt is over.
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

from . import train
from .celery_app import JOIN_JOB, JOIN_QUEUE, app
from .lease import LeaseLost
from .runtime import runtime, use_datasets

log = logging.getLogger("metashrink.worker")
ROOT = Path(__file__).resolve().parent.parent

ATTEMPT_FAILED = 3   # a rank's exit code: a collective failed (another rank died); the attempt, not the job
GRACE = 5.0          # seconds rank 0 gets to finish on its own once another rank has died or the lease is gone
NODE_TIMEOUT = 30.0  # seconds without a joined node's beat before the attempt fails


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
    """What a worker can tell and the API cannot: the devices on its machine (ValueError naming them)."""
    world, nodes = world_of(cfg)
    per_node = world // nodes
    if per_node > settings.max_world_size:
        raise ValueError(f"execution.world_size / nodes = {per_node} ranks per node exceeds this worker's "
                         f"METASHRINK_MAX_WORLD_SIZE ({settings.max_world_size})")
    if rank_device(cfg, 0).startswith("cuda"):
        import torch
        n = torch.cuda.device_count()
        if per_node > n:
            raise ValueError(f"execution.world_size / nodes = {per_node} ranks per node need {per_node} GPUs (one "
                             f"per rank) on each node's machine; {settings.node_name} has {n}")


def _spawn(spec_path: Path, ranks) -> list[subprocess.Popen]:
    """One ``python -m worker.ranks SPEC RANK`` process per rank, each killed when this process exits."""
    from .embedded import die_with_parent
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    procs = []
    for r in ranks:
        procs.append(subprocess.Popen([sys.executable, "-m", "worker.ranks", str(spec_path), str(r)],
                                      cwd=str(ROOT), env=env, preexec_fn=partial(die_with_parent, os.getpid())))
    return procs


def _reap(procs, grace: float = 0.0) -> None:
    end = time.monotonic() + grace
    while grace and any(p.poll() is None for p in procs) and time.monotonic() < end:
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait for anything
            pass


# --------------------------------------------------------------------------- the launcher (pool child)
def supervise(rt, job_id: str, owner: str, cfg: dict, tenant: str) -> str:
    """Launch the job's ranks (this machine's; on several nodes, ask the others to join) and wait for them.
    Returns the outcome as ``run_job`` does ("succeeded", "failed", "canceled", "lease-lost", or
    "attempt-failed")."""
    import datetime
    import socket

    import torch.distributed as dist

    from store import jobs as Q

    s = rt.settings
    check_resources(cfg, s)
    world, nodes = world_of(cfg)
    per_node = world // nodes
    host = "127.0.0.1" if nodes == 1 else (s.rendezvous_host or socket.gethostname())
    store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=s.dist_timeout))
    tmp = Path(tempfile.mkdtemp(prefix=f"metashrink-{job_id}-"))
    spec = {"job_id": job_id, "owner": owner, "tenant": tenant, "config": cfg, "world_size": world, "nodes": nodes,
            "per_node": per_node, "store_host": host, "store_port": store.port,
            "prefix": f"{job_id}/{uuid.uuid4().hex[:8]}", "timeout": s.dist_timeout, "dir": str(tmp)}
    (tmp / "spec.json").write_text(json.dumps(spec))
    procs: list[subprocess.Popen] = []
    try:
        if nodes > 1:
            store.add(f"name/{s.node_name}", 1)  # this machine is node 0
            remote = {k: v for k, v in spec.items() if k != "dir"}
            for _ in range(nodes - 1):
                app.send_task(JOIN_JOB, args=[remote], queue=JOIN_QUEUE, expires=s.join_timeout)
        procs = _spawn(tmp / "spec.json", range(per_node))
        log.info("job %s: ranks 0..%d of %d started here (pids %s), rendezvous %s:%d", job_id, per_node - 1, world,
                 [p.pid for p in procs], host, store.port)
        outcome = _wait(rt, Q, job_id, owner, procs, tmp, store if nodes > 1 else None, nodes)
    finally:
        if nodes > 1:
            try:
                store.set("end", "1")  # the joiners stop their ranks (as they do when the store closes)
            except Exception:  # pragma: no cover - our own store
                pass
        _reap(procs)
        del store
        shutil.rmtree(tmp, ignore_errors=True)
    if outcome == "attempt-failed":
        with rt.db.session() as ses:
            Q.abandon(ses, job_id, owner)
        log.warning("job %s: a rank was lost; the attempt failed and the job resumes from its latest checkpoint",
                    job_id)
    return outcome


def _wait(rt, Q, job_id, owner, procs, tmp: Path, store=None, nodes: int = 1) -> str:
    s = rt.settings
    ready = tmp / "ready"
    every = s.lease_seconds / 3
    start = last = last_nodes = time.monotonic()
    beats: dict = {}  # node -> (counter, when it last moved)
    deadline = None  # set once a rank died or the lease is gone: rank 0 gets GRACE seconds to finish
    why = None

    def fail(reason, grace=GRACE):
        nonlocal deadline, why
        if deadline is None:
            log.warning("job %s: %s", job_id, reason)
            why, deadline = reason, time.monotonic() + grace

    while True:
        codes = [p.poll() for p in procs]
        if codes[0] is not None:
            result = _result(tmp)
            if codes[0] == 0 and result:
                _reap(procs[1:], GRACE)  # the other ranks were told to stop; a moment to leave the group
                return result
            log.warning("job %s: rank 0 %s", job_id, _describe(codes[0]) if codes[0] else "exited without a result")
            return "attempt-failed"
        dead = [(r, c) for r, c in enumerate(codes) if c]  # a rank that exits 0 was told to stop by rank 0
        if dead:
            fail(", ".join(f"rank {r} {_describe(c)}" for r, c in dead))
        now = time.monotonic()
        if store is not None and now - last_nodes > 1.0:
            last_nodes = now
            joined = store.add("joined", 0)
            if store.add("failed", 0):
                fail("a rank on another node died")
            elif joined < nodes - 1 and now - start > s.join_timeout:
                fail(f"{joined} of the {nodes - 1} other nodes joined within {s.join_timeout:.0f} s (is a join worker, "
                     f"-Q {JOIN_QUEUE}, running on {nodes - 1} other machines?)", grace=0.0)
            for k in range(1, nodes):
                n = store.add(f"beat/{k}", 0)
                if n and beats.get(k, (0, 0))[0] != n:
                    beats[k] = (n, now)
                elif n and now - beats[k][1] > NODE_TIMEOUT:
                    fail(f"node {k} stopped beating {NODE_TIMEOUT:.0f} s ago", grace=0.0)
        if now - last > every:
            last = now
            with rt.db.session() as ses:
                # while the ranks start, the launcher keeps the lease; then rank 0's heartbeats do
                ours = Q.owns(ses, job_id, owner) if ready.exists() else Q.renew(ses, job_id, owner, s.lease_seconds)
            if not ours:
                fail("the lease is no longer ours")
        if deadline is not None and time.monotonic() > deadline:
            return "lease-lost" if why == "the lease is no longer ours" else "attempt-failed"
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


# --------------------------------------------------------------------------- a joining node (join worker)
@app.task(name=JOIN_JOB, acks_late=False)
def join_job(spec: dict) -> str:
    """Run this machine's share of a multi-node job's ranks (see the module docstring). Acknowledged on receipt:
    a joiner that dies fails its attempt, and the next attempt sends fresh messages."""
    import datetime

    import torch.distributed as dist
    s = app.conf.metashrink_settings
    job_id, nodes, per_node = spec["job_id"], int(spec["nodes"]), int(spec["per_node"])
    try:
        store = dist.TCPStore(spec["store_host"], int(spec["store_port"]), is_master=False,
                              timeout=datetime.timedelta(seconds=10))
    except Exception as e:
        log.info("job %s: not joining, the rendezvous is gone (%s)", job_id, type(e).__name__)
        return "stale"
    procs: list[subprocess.Popen] = []
    tmp = None
    try:
        if store.check(["end"]):
            return "stale"
        if store.add(f"name/{s.node_name}", 1) > 1:  # this machine holds a node of this job: another one's turn
            app.send_task(JOIN_JOB, args=[spec], queue=JOIN_QUEUE, countdown=1,
                          expires=max(1.0, s.join_timeout / 2))
            return "elsewhere"
        k = store.add("next_node", 1)
        if k >= nodes:
            return "extra"  # a duplicate message
        try:
            check_resources(spec["config"], s)
        except ValueError as e:
            log.warning("job %s: node %d cannot run here: %s", job_id, k, e)
            store.add("failed", 1)
            return "failed"
        tmp = Path(tempfile.mkdtemp(prefix=f"metashrink-{job_id}-node{k}-"))
        (tmp / "spec.json").write_text(json.dumps({**spec, "dir": str(tmp)}))
        procs = _spawn(tmp / "spec.json", range(k * per_node, (k + 1) * per_node))
        log.info("job %s: node %d (%s): ranks %d..%d started (pids %s)", job_id, k, s.node_name, k * per_node,
                 (k + 1) * per_node - 1, [p.pid for p in procs])
        store.add("joined", 1)
        return _watch_node(store, procs, job_id, k, per_node)
    except Exception as e:  # the claimant's store closed: the attempt is over
        log.info("job %s: the rendezvous closed (%s); stopping this node's ranks", job_id, type(e).__name__)
        _reap(procs, GRACE)
        return "ended"
    finally:
        _reap(procs)
        del store
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _watch_node(store, procs, job_id: str, k: int, per_node: int) -> str:
    """Node ``k``'s ranks polled every half second, its beat counted in the store, until they finish ("done"), one
    dies ("rank-lost", reported to the claimant) or the claimant says the attempt is over ("ended")."""
    while True:
        codes = [p.poll() for p in procs]
        if any(codes):
            log.warning("job %s: node %d: %s", job_id, k, ", ".join(
                f"rank {k * per_node + i} {_describe(c)}" for i, c in enumerate(codes) if c))
            store.add("failed", 1)
            return "rank-lost"
        if all(c == 0 for c in codes):
            return "done"
        store.add(f"beat/{k}", 1)
        if store.check(["end"]):
            _reap(procs, GRACE)
            return "ended"
        time.sleep(0.5)


# --------------------------------------------------------------------------- a rank (its own process)
def _rank0(rt, spec: dict, comm) -> str:
    """``run_job``'s handling around ``train.train``, with rank 0 of the group."""
    from core.distributed import RankLost

    job_id, owner = spec["job_id"], spec["owner"]
    try:
        return train.train(rt, train.load(rt, job_id, owner), comm=comm)
    except LeaseLost:
        log.warning("job %s: lease lost; stopping", job_id)
        return "lease-lost"
    except RankLost:
        raise
    except Exception as e:
        return train.fail(rt, job_id, owner, e)
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

    rt = runtime()
    if rt.settings.torch_threads:
        torch.set_num_threads(rt.settings.torch_threads)
    cfg, world = spec["config"], int(spec["world_size"])
    local_rank = rank % int(spec.get("per_node") or world)
    tmp = Path(spec["dir"])
    try:
        comm = Comm.join(spec["store_host"], spec["store_port"], rank, world, device=rank_device(cfg, local_rank),
                         prefix=spec["prefix"], timeout=float(spec["timeout"]),
                         ready_path=str(tmp / "ready") if rank == 0 else None)
        outcome = None
        try:
            if rank == 0:
                outcome = _rank0(rt, spec, comm)
            else:
                use_datasets(rt, spec["tenant"], cfg["tasks"])
                steps = follow(MetaTrainer(cfg, comm=comm))
                outcome = f"followed {steps} steps"
        finally:
            Comm.leave(together=outcome is not None and comm.synced)  # every rank then reaches the barrier
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
