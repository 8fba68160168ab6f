"""One meta-training job across ranks with ``torch.distributed`` (``execution.world_size`` > 1).

Design (see README, "Multi-device jobs"):

- Sampling: every rank draws the *whole* meta-batch (tasks and the algorithm's per-task noise) from its own copy
  of the job's generator, in the same state on every rank, and adapts only its contiguous share
  (``shard``: sizes differ by at most one). The meta-batch is therefore exactly the one the world-size-1 job
  draws for the same seed, the shares are disjoint and cover it, and every rank's generator stays in the
  world-size-1 job's state, so rank 0's checkpoint (phi, optimiser state, RNG) resumes the job bit for bit,
  at any world size.
- Reduction: ``reduce_tasks``'s finite-task mean stays exact across ranks because what is all-reduced are the
  *sums* of the finite tasks' updates, the number of finite tasks and the metric sums and task counts (one
  float64 buffer, one ``all_reduce(SUM)`` per meta-step), never per-rank means; the mean, the
  ``skipped_tasks`` count and the metric means are formed after the reduction, identically on every rank.
  Clipping and the outer update then run on every rank on the same numbers, so every rank holds the same phi.
  Against world size 1 only the order of the float additions differs (measured in tests/test_core_distributed.py).
- Control: rank 0 drives. Before each meta-step it broadcasts STEP (or STOP when it is done, cancelled or has
  lost its lease), so the other ranks (``follow``) never need the job's schedule, validation or database.
  Before the first step rank 0 broadcasts its state (``sync_state``: a fresh or resumed trainer), so the other
  ranks never read checkpoints.
- Failures: an error in any collective (a peer that died closes its sockets; gloo and NCCL raise) becomes
  ``RankLost``: the attempt failed, not the job (the worker hands the job back to the lease machinery).

Backends: gloo on CPU, NCCL on CUDA (each rank on ``cuda:<local rank>``).
"""
from __future__ import annotations

import datetime
from pathlib import Path

import torch
import torch.distributed as dist

STEP, STOP = 1, 0


class RankLost(RuntimeError):
    """A collective failed: another rank died or the process group broke. The attempt fails; the job resumes
    from its last checkpoint."""


def shard(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` tasks (``torch.tensor_split`` sizes: the first ``n % W`` ranks
    take one more)."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def backend_for(device: torch.device) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


class Comm:
    """A rank's view of the job's process group (the default group of this process)."""

    def __init__(self, rank: int, world_size: int, device: str | torch.device = "cpu", ready_path=None):
        self.rank, self.world_size = int(rank), int(world_size)
        self.device = torch.device(device)
        self.ready_path = ready_path  # rank 0 touches it once every rank has joined and holds its state
        self.synced = False

    # ------------------------------------------------------------------ set-up
    @classmethod
    def join(cls, store_host: str, store_port: int, rank: int, world_size: int, device="cpu",
             prefix: str = "metashrink", timeout: float = 600.0, ready_path=None) -> "Comm":
        """Join the process group through the TCPStore at ``store_host:store_port`` (the rendezvous, hosted by
        whoever launched the ranks). ``timeout`` bounds the rendezvous and every collective."""
        td = datetime.timedelta(seconds=timeout)
        store = dist.TCPStore(store_host, int(store_port), is_master=False, timeout=td)
        device = torch.device(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend_for(device), store=dist.PrefixStore(prefix, store), rank=int(rank),
                                    world_size=int(world_size), timeout=td)
        except Exception as e:
            raise RankLost(f"rank {rank}: the rendezvous failed: {e}") from e
        return cls(rank, world_size, device, ready_path)

    @staticmethod
    def leave(together: bool = False) -> None:
        """Destroy the process group. ``together`` (a rank that finished normally): a barrier first, so no rank
        destroys its gloo connections while a peer still uses them; without it a rank sometimes aborted in
        teardown ("terminate called without an active exception", SIGABRT; about 1 run in 6 of
        tests/test_core_distributed.py here). A rank leaving on an error skips it: its peers are not at a barrier."""
        if dist.is_initialized():
            try:
                if together:
                    dist.barrier()
                dist.destroy_process_group()
            except Exception:  # a broken group (a peer is gone): nothing left to tidy
                pass

    # ------------------------------------------------------------------ collectives (errors -> RankLost)
    def _call(self, what, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except RankLost:
            raise
        except Exception as e:
            raise RankLost(f"rank {self.rank}: {what} failed (another rank died or the group broke): {e}") from e

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        self._call("all_reduce", dist.all_reduce, t, op=dist.ReduceOp.SUM)
        return t

    def broadcast_object(self, obj=None, src: int = 0):
        box = [obj if self.rank == src else None]
        self._call("broadcast", dist.broadcast_object_list, box, src=src,
                   device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def command(self, cmd: int | None = None) -> int:
        """Rank 0 sends ``cmd`` (STEP/STOP); every other rank receives and returns it."""
        t = torch.tensor([cmd if self.rank == 0 else -1], dtype=torch.int64, device=self.device)
        self._call("broadcast", dist.broadcast, t, src=0)
        return int(t.item())

    # ------------------------------------------------------------------ the job's state
    def sync_state(self, trainer) -> None:
        """Rank 0's trainer state (phi, log sigma^2, extra, optimiser state, RNG, step, vectorize) on every
        rank, bit for bit (pickled tensors). Rank 0 has built the trainer and loaded the checkpoint, if any."""
        state = trainer.state_dict() if self.rank == 0 else None
        state = self.broadcast_object(state)
        if self.rank != 0:
            trainer.load_state_dict(*state)
        self.synced = True
        if self.rank == 0 and self.ready_path:
            Path(self.ready_path).touch()

    def stop(self) -> None:
        """Rank 0: tell the other ranks the job is over (best effort: they may be gone already)."""
        if self.rank == 0 and self.synced:
            try:
                self.command(STOP)
            except RankLost:
                pass
            self.synced = False

    # ------------------------------------------------------------------ reduction
    def reduce_tasks(self, deltas, metrics):
        """``core.trainer.reduce_tasks`` over the tasks of every rank: the mean of the finite tasks' updates
        (those whose inner loop diverged left out and counted in ``skipped_tasks``), the metric means over
        every task. All-reduced are sums and counts, in float64, so the mean's denominator is the global
        number of finite tasks, whatever the split."""
        leaves, spec = torch.utils._pytree.tree_flatten(deltas)
        ok = torch.stack([torch.isfinite(t.reshape(t.shape[0], -1)).all(1) for t in leaves]).all(0)  # [b]
        parts = []
        for t in leaves:
            shape = (-1,) + (1,) * (t.dim() - 1)
            parts.append(torch.where(ok.view(shape), t, torch.zeros_like(t)).double().sum(0).reshape(-1))
        names = sorted(metrics)
        m_sum = [metrics[k].double().sum().reshape(1) for k in names]
        m_cnt = [torch.tensor([float(metrics[k].numel())], dtype=torch.float64, device=ok.device) for k in names]
        counts = torch.stack([ok.sum().double(), torch.tensor(float(ok.numel()), dtype=torch.float64,
                                                               device=ok.device)])
        buf = torch.cat(parts + m_sum + m_cnt + [counts])
        self.all_reduce_sum(buf)
        n_ok, n_all = buf[-2], buf[-1]
        out, i = [], 0
        denom = n_ok.clamp(min=1)
        for t in leaves:
            size = t[0].numel()
            out.append((buf[i:i + size] / denom).to(t.dtype).reshape(t.shape[1:]))
            i += size
        sums, cnts = buf[i:i + len(names)], buf[i + len(names):i + 2 * len(names)]
        mout = {k: (sums[j] / cnts[j]).float() for j, k in enumerate(names)}
        mout["skipped_tasks"] = (n_all - n_ok).float()
        return torch.utils._pytree.tree_unflatten(out, spec), mout


def follow(trainer) -> int:
    """Ranks > 0: receive rank 0's state, then meta-step while rank 0 says STEP. Returns the steps taken."""
    comm = trainer.comm
    comm.sync_state(trainer)
    n = 0
    while comm.command() == STEP:
        trainer.step()
        n += 1
    return n


# --------------------------------------------------------------------------- local launch (tests, scripts)
def _local_rank_main(rank, world_size, port, fn, args, timeout):
    torch.set_num_threads(1)
    comm = Comm.join("127.0.0.1", port, rank, world_size, timeout=timeout)
    done = False
    try:
        fn(comm, *args)
        done = True
    finally:
        Comm.leave(together=done)


def run_local(fn, world_size: int, *args, timeout: float = 300.0) -> None:
    """Run ``fn(comm, *args)`` in ``world_size`` fresh processes (``torch.multiprocessing.spawn``) joined into one
    gloo group on this machine, with a TCPStore hosted by the caller as the rendezvous. ``fn`` must be
    importable (module level); results go through files. Raises when any rank fails."""
    import torch.multiprocessing as mp
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    try:
        mp.spawn(_local_rank_main, args=(world_size, store.port, fn, args, timeout), nprocs=world_size, join=True)
    finally:
        del store
