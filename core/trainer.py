"""The meta-step skeleton and everything needed to checkpoint and resume it bit for bit.

Over 450 lines on purpose (issue 24): ``MetaTrainer`` is one object whose step paths (vmap or per-task threads,
eager or compiled, the "auto" compile decision, torch.distributed ranks) share the meta state, the outer
optimizer, the generator and the checkpointed decisions; splitting them across modules would pass that state
around instead of keeping the resume contract (same numbers to the bit) in one place. The per-task update rules
live in ``core.algorithms`` / ``core.baselines``, the rank plumbing in ``core.distributed``.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.func import grad, vmap

from . import algorithms, baselines  # noqa: F401  (each registers its algorithms in core.registry)
from .compile_cache import CompileRecords, cache_counters, counters_delta, shape_key
from .models import build_model, init_params
from .modules import LOG_SIGMA2_MAX, LOG_SIGMA2_MIN, build_partition, inverse_gamma_penalty, sigma2
from .optim import build_optimizer, flatten_state, unflatten_state
from .registry import Learner, build_algorithm
from .tasks import build_family

STATE_VERSION = 1

# execution.compile "auto" (MetaTrainer._auto_compile_step): a few timed eager steps, then compile only when the
# eager time left in the job repays the expected compile time, and keep the compiled step only if it is faster.
AUTO_EAGER_SAMPLES = 3    # timed eager steps before the decision (after one untimed warm-up step per process)
AUTO_MIN_REMAINING = 100  # steps that must be left at the decision; shorter jobs never compile
# expected compile time without a record of this job shape (a cold cache): on 2 shared cores 24-31 s for the
# sinusoid MLP (vmap, whole meta-step) and 32-35 s for conv4 (one task's update) at load 1.3-2.7, 36-71 s under
# heavier load (benchmarks/RESULTS.md, "Compile cache" and "Core")
COLD_COMPILE_S = 40.0
# ... and with one (the cache holds the graph) until a warm compile of the shape has been measured: 2.8-3.8 s
WARM_COMPILE_S = 5.0
# compile when the remaining eager time is at least this many times the expected compile time (an unknown
# speed-up: at worst, a compiled step no faster than eager, the job takes 1 + 1/1.5 times as long; measured
# speed-ups 1.25x conv4, 8x sinusoid) ...
REPAY_UNKNOWN = 1.5
# ... or, when a record says how much faster the compiled step was, when the time it saves is at least this many
# times the expected compile time
REPAY_KNOWN = 1.5
# a record saying the compiled step was slower than eager (measured once, on a host whose load varies) holds for
# this long; after it the next long job of the shape measures again (a failed compile is not retried: the record
# is per torch version, and the same graph fails the same way)
RETRY_SLOWER_AFTER_S = 7 * 24 * 3600.0


def reduce_tasks(deltas, metrics):
    """Mean of the per-task meta-updates over the tasks whose update is finite, and the metric means.

    A task whose inner loop diverged (an inner learning rate too large for the current phi) gives inf/NaN
    updates; averaged in, one such task would poison phi and the outer optimizer state for good. Such tasks
    are left out of the mean and counted in the ``skipped_tasks`` metric (when every task of the meta-batch
    diverged the update is zero). The metric means include every task, so a divergence stays visible.
    Data-independent control flow (``torch.where``), so it vmaps and compiles.
    """
    leaves = torch.utils._pytree.tree_leaves(deltas)
    ok = torch.stack([torch.isfinite(t.reshape(t.shape[0], -1)).all(1) for t in leaves]).all(0)  # [B]
    n_ok = ok.sum()
    weight = ok.to(leaves[0].dtype) / n_ok.clamp(min=1).to(leaves[0].dtype)

    def mean(t):
        shape = (-1,) + (1,) * (t.dim() - 1)
        return (torch.where(ok.view(shape), t, torch.zeros_like(t)) * weight.view(shape)).sum(0)

    out = {k: v.float().mean() for k, v in metrics.items()}
    out["skipped_tasks"] = (ok.numel() - n_ok).float()
    return torch.utils._pytree.tree_map(mean, deltas), out


def clip_delta(delta, metrics, max_norm=None):
    """Global-norm clipping of the meta-gradient (every leaf of ``delta`` together, as
    ``torch.nn.utils.clip_grad_norm_``); records the norm before clipping as the ``grad_norm`` metric.

    Without it one task at the edge of inner-loop stability can give a meta-gradient 1e30 times the usual
    one; Adam's second-moment estimate then stays that large for thousands of steps and freezes meta-training
    wherever it is, e.g. at Meta-SGD learning rates or a T-net T that make held-out tasks diverge. Clipped,
    such a task still dominates the direction of the mean update (away from the unstable region) but not its
    size. Data-independent control flow, so it compiles."""
    leaves = torch.utils._pytree.tree_leaves(delta)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in leaves]))
    metrics = {**metrics, "grad_norm": norm}
    if max_norm is None:
        return delta, metrics
    scale = (max_norm / (norm + 1e-12)).clamp(max=1.0)
    return torch.utils._pytree.tree_map(lambda t: t * scale.to(t.dtype), delta), metrics


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class MetaTrainer:
    """Meta-trains one job config (the dict form of ``schemas.JobConfig``).

    >>> trainer = MetaTrainer(config)
    >>> for _ in range(trainer.total_steps): metrics = trainer.step()
    >>> model = trainer.meta_model()     # core.MetaModel: adapt / predict / module_map
    """

    def __init__(self, config: dict, device: str | torch.device | None = None, comm=None,
                 task_threads: int | None = None):
        """``task_threads``: threads of the per-task loop on CPU (``_map_tasks``); None = torch's intra-op thread
        count. A worker passes the CPUs it may use, whatever its intra-op count (one per task thread)."""
        self.config = config
        self.task_threads = task_threads
        ex = config["execution"]
        # a core.distributed.Comm: this trainer is one rank of a multi-rank job (execution.world_size > 1)
        self.comm = comm
        if comm is not None and device is None:
            device = comm.device
        self.device = resolve_device(device or ex["device"]) if not isinstance(device, torch.device) else device
        self.dtype = getattr(torch, ex["dtype"])
        self.seed = int(config["seed"])
        self.generator = torch.Generator().manual_seed(self.seed)
        self.family = build_family(config["tasks"], self.seed)
        self.model = build_model(config["model"], self.family, amp=ex.get("amp", False)).to(self.device)
        phi = {k: v.to(self.device) for k, v in init_params(self.model, self.generator, self.dtype).items()}
        mods = config["modules"]
        self.partition = build_partition(phi, mods["partition"], mods.get("groups"))
        inner = config["inner"]
        self.learner = Learner(self.model, self.family, self.partition,
                               build_optimizer(inner["optimizer"], inner["lr"], inner["betas"], inner["eps"]),
                               inner["steps"], lr=inner["lr"])
        self.algorithm = build_algorithm(config["algorithm"], self.learner)
        phi = self.algorithm.prepare_phi(phi)
        self.meta = {"phi": phi, "log_sigma2": self.algorithm.init_log_sigma2(len(self.partition.names),
                                                                              self.dtype, self.device)}
        # an algorithm's own meta-learned tensors (Meta-SGD's alpha, T-net's T, ...); absent when it has none
        extra = self.algorithm.init_extra(phi)
        if extra:
            self.meta["extra"] = extra
        outer = config["outer"]
        self.outer = build_optimizer(outer["optimizer"], outer["lr_phi"])
        self.outer_state = {"phi": self.outer.init(self.meta["phi"]),
                            "log_sigma2": self.outer.init({"log_sigma2": self.meta["log_sigma2"]})}
        if extra:
            self.outer_state["extra"] = self.outer.init(extra)
        self.step_count = 0
        self.total_steps = int(outer["steps"])
        self.vectorize = ex["vectorize"]  # "auto" is resolved by measurement on the first step
        # execution.compile: True, False or "auto" (resolved by measurement, _auto_compile_step); self.compiled
        # says which path the meta-steps take now, compile_info what was decided and measured
        self.compile_setting = ex["compile"]
        self.compiled = self.compile_setting is True
        self._compile_decided = self.compile_setting != "auto" or comm is not None  # ranks stay eager
        self._compile_timed = False  # the first compiled call (compile time) has been measured
        self._eager_times: list = []
        self._auto_calls = 0
        self.compile_info = {"setting": self.compile_setting,
                             "decision": "pending" if not self._compile_decided else
                             ("compiled" if self.compiled else "eager"),
                             "reason": "execution.compile" if self.compile_setting != "auto" else
                             ("multi-rank jobs stay eager" if comm is not None else None)}
        self._fns = {}
        self._pool = None  # worker threads of the per-task loop (_map_tasks)
        self.recompiles = 0  # compiled per-task loop: batches whose task threads met a guard failure (_batched)

    # ------------------------------------------------------------------ per-task updates
    def _batched(self, mode: str, compile: bool | None = None):
        compile = self.compiled if compile is None else compile
        key = (mode, compile)
        if key not in self._fns:
            # args: xs, ys, xq, yq and the algorithm's per-task noise, all with a leading task axis
            if mode == "vmap":
                update = self.algorithm.task_update
                batched = vmap(lambda meta, args: update(meta, *args), in_dims=(None, 0))

                def fn(meta, *args):
                    return batched(meta, args)
                if compile:
                    # dynamo cannot trace jvp-of-grad under vmap (a device mismatch on meta tensors in torch
                    # 2.13); reverse-over-reverse Hessian-vector products compile
                    self.algorithm.hvp = "reverse"
                    fn = torch.compile(fn, dynamic=False)
            else:
                if compile:
                    # one task's update is compiled and the loop stays in Python: the graph does not grow with
                    # the meta-batch (compiling the loop unrolls meta_batch copies of it: > 400 s for conv4)
                    self.algorithm.hvp = "reverse"
                    update = torch.compile(self.algorithm.task_update, dynamic=False)
                else:
                    update = self.algorithm.eager_task_update
                compiled = [False]

                def on_threads(meta, args):
                    # compiled code only, on the task threads: concurrent compiles are not thread-safe
                    # (pytorch#118260), so a guard that fails there (a new shape mid-job) raises instead
                    with torch.compiler.set_stance("fail_on_recompile"):
                        return self._map_tasks(update, meta, args)

                def fn(meta, *args):
                    if not compile:
                        outs = self._map_tasks(update, meta, args)
                    else:
                        outs = None
                        if compiled[0]:
                            try:
                                outs = on_threads(meta, args)
                            except RuntimeError as e:
                                if "fail_on_recompile" not in str(e):
                                    raise
                                self.recompiles += 1  # the batch runs again below, compiling its first task
                        if outs is None:
                            # the first task alone on this thread compiles (Dynamo compiles one caller at a time),
                            # with the intra-op thread count the task threads run at: Inductor bakes it into its
                            # kernels
                            threads = torch.get_num_threads()
                            if self._task_workers(args[0].shape[0]) > 1:
                                torch.set_num_threads(1)
                            try:
                                first = update(meta, *(a[0] for a in args))
                            finally:
                                torch.set_num_threads(threads)
                            compiled[0] = True
                            outs = [first] + on_threads(meta, tuple(a[1:] for a in args))
                    return torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *outs)
            self._fns[key] = fn
        return self._fns[key]

    def _map_tasks(self, update, meta, args):
        """``update`` on every task of the batch, in task order. On CPU the tasks are split into contiguous
        shares, one per task thread (``task_threads``), each share run by its own thread with one intra-op thread:
        the per-task graphs are small (a 5-image support, a 75-image query), so two tasks at a time on two cores
        beat one task at a time on both (conv4: benchmarks/peers.py, "Peers"). The results do not depend on the
        scheduling (each task's numbers are computed by one thread and stacked in order); they depend on the
        intra-op thread count, as any run does."""
        n = args[0].shape[0]
        workers = self._task_workers(n)

        def run(tasks):
            if workers > 1:
                torch.set_num_threads(1)
            return [update(meta, *(a[i] for a in args)) for i in tasks]

        if workers <= 1:
            return run(range(n))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="metashrink-task")
        shares = [range(n * w // workers, n * (w + 1) // workers) for w in range(workers)]
        threads = torch.get_num_threads()
        try:
            return [out for part in self._pool.map(run, shares) for out in part]
        finally:
            torch.set_num_threads(threads)

    def _task_workers(self, n: int) -> int:
        if self.device.type != "cpu" or not self.algorithm.thread_safe:
            return 1
        return min(n, self.task_threads or torch.get_num_threads())

    def task_updates(self, batch, mode=None):
        """Per-task meta-updates and metrics, each with a leading task axis."""
        return self._batched(mode or self.vectorize)(self.meta, *batch)

    def _choose_vectorization(self, batch):
        timings = {}
        for mode in ("loop", "vmap"):
            try:
                # timed eager: with execution.compile only the winner is compiled afterwards (one compile, 30-60 s
                # on 2 cores, instead of two)
                fn = self._batched(mode, compile=False)
                fn(self.meta, *batch)  # warm-up
                t0 = time.perf_counter()
                out = fn(self.meta, *batch)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()
                timings[mode] = (time.perf_counter() - t0, out)
            except Exception:  # an op without a vmap batching rule: fall back to the loop
                if mode == "loop":
                    raise
        self.vectorize = min(timings, key=lambda m: timings[m][0])
        return timings[self.vectorize][1]

    # ------------------------------------------------------------------ the meta-step
    def sample(self, split: str = "train"):
        n = self.config["outer"]["meta_batch"]
        return self.family.sample(n, self.generator, split).to(self.device, self.dtype)

    def _with_noise(self, batch):
        """The task tensors followed by the algorithm's per-task noise (drawn from the job's generator)."""
        noise = self.algorithm.noise(batch.xs.shape[0], self.generator, self.dtype, self.device)
        return (*batch, *noise) if noise else batch

    def lr_factor(self) -> float:
        if self.config["outer"]["schedule"] == "linear":
            return max(0.0, 1.0 - self.step_count / self.total_steps)
        return 1.0

    def step(self) -> dict:
        """One meta-step. Returns its metrics as floats."""
        batch = self._with_noise(self.sample())
        if self.comm is not None:
            metrics = self._step_ranks(batch)
        elif self.vectorize == "auto":
            delta, metrics = self.reduce(*self._choose_vectorization(batch))
            self.apply(delta)
        elif not self._compile_decided:
            metrics = self._auto_compile_step(batch)
        elif self.compiled and not self._compile_timed:
            metrics = self._first_compiled_step(batch)
        elif self.compiled and self.vectorize == "vmap":
            # the whole meta-step (task updates, mean, outer update, metric means) as one compiled graph
            f = torch.tensor(self.lr_factor(), dtype=self.dtype, device=self.device)
            self.meta, self.outer_state, metrics = self._fused(self.vectorize)(self.meta, self.outer_state, f,
                                                                               *batch)
        else:
            delta, metrics = self.reduce(*self.task_updates(batch))
            self.apply(delta)
        self.step_count += 1
        out = {k: float(v) for k, v in metrics.items()}
        if self.algorithm.learns_sigma:
            s2 = self.sigma2()
            out["sigma2_max"], out["sigma2_min"] = float(s2.max()), float(s2.min())
        return out

    def _step_ranks(self, batch):
        """One rank's part of a multi-rank meta-step (see core.distributed): the whole meta-batch was drawn
        (every rank's generator stays in the world-size-1 job's state); this rank adapts its share, the finite
        tasks' sums and counts are all-reduced, and the outer update runs on every rank on the same numbers.
        With execution.compile only the per-task function is compiled (the collective stays eager)."""
        from .distributed import STEP, shard
        comm = self.comm
        if comm.rank == 0:
            comm.command(STEP)
        part = tuple(t[shard(batch[0].shape[0], comm.rank, comm.world_size)] for t in batch)
        if self.vectorize == "auto":
            out = self._choose_vectorization(part)
            mode = comm.broadcast_object(self.vectorize)  # every rank runs rank 0's choice
            if mode != self.vectorize:
                self.vectorize = mode
                out = self.task_updates(part)
        else:
            out = self.task_updates(part)
        delta, metrics = clip_delta(*comm.reduce_tasks(*out), self.config["outer"].get("clip_grad_norm"))
        self.apply(delta)
        return metrics

    def _fused(self, mode: str):
        key = ("fused", mode)
        if key not in self._fns:
            batched = self._batched(mode, compile=False)

            def fn(meta, outer_state, f, *batch):
                delta, metrics = self.reduce(*batched(meta, *batch))
                meta, outer_state = self.outer_update(meta, outer_state, delta, f)
                return meta, outer_state, metrics

            self.algorithm.hvp = "reverse"  # see _batched
            self._fns[key] = torch.compile(fn, dynamic=False)
        return self._fns[key]

    # ------------------------------------------------------------------ compilation
    def _advance(self, batch, compiled: bool):
        """One meta-step's result, (meta, outer_state, metrics), eager or compiled, without changing the trainer:
        the step() paths as a pure function, so that execution.compile "auto" can time both on one batch."""
        if compiled and self.vectorize == "vmap":
            f = torch.tensor(self.lr_factor(), dtype=self.dtype, device=self.device)
            return self._fused(self.vectorize)(self.meta, self.outer_state, f, *batch)
        delta, metrics = self.reduce(*self._batched(self.vectorize, compile=compiled)(self.meta, *batch))
        meta, outer_state = self.outer_update(self.meta, self.outer_state, delta, self.lr_factor())
        return meta, outer_state, metrics

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return out, time.perf_counter() - t0

    def compile_key(self) -> str:
        """This job shape's key among the compile records (core.compile_cache.shape_key)."""
        return shape_key(self.config, self.vectorize, self.device, self.family.input_shape, self.family.output_dim)

    def _first_compiled_step(self, batch):
        """The first compiled meta-step in this process: its time is the compile time (plus one step), and the
        cache counters say whether the compiled code came from the cache."""
        before = cache_counters()
        (self.meta, self.outer_state, metrics), dt = self._timed(self._advance, batch, True)
        self._compile_timed = True
        cache = counters_delta(before, cache_counters())
        cold = bool(cache["fxgraph_miss"] or cache["aot_miss"])
        self.compile_info.update(compile_s=round(dt, 3), cache=cache, cache_hit=not cold,
                                 at_step=self.step_count)
        CompileRecords().put(self.compile_key(), **{("cold_compile_s" if cold else "warm_compile_s"): dt})
        return metrics

    def _auto_compile_step(self, batch):  # ~85 lines: one decision procedure, read top to bottom (measure,
        # decide, compile, compare, record); its branches each end the step, and split apart they would need the
        # timings threaded through
        """A meta-step of an execution.compile "auto" job before its decision. One untimed eager step (lazy
        imports, first traces), AUTO_EAGER_SAMPLES timed ones, then the decision on the next step's batch: with
        R steps left and eager step time e, compile when R >= AUTO_MIN_REMAINING and R e >= REPAY_UNKNOWN x the
        expected compile time (COLD_COMPILE_S, or the last warm compile of this shape when the compile records
        know it: the cache holds the graph). When a record says how much faster the compiled step was (ratio
        r), the saving R e (1 - r) must be REPAY_KNOWN x the expected compile time; a shape whose compiled
        step was slower is not compiled again for RETRY_SLOWER_AFTER_S, one that failed to compile never. After
        compiling, the compiled step is timed on the same batch and kept only if it beats the eager one. The step's numbers come from the path
        kept (eager before the decision), and checkpoints record the decision (a resumed job keeps it)."""
        self._auto_calls += 1
        if self._auto_calls <= 1 + AUTO_EAGER_SAMPLES:
            (self.meta, self.outer_state, metrics), dt = self._timed(self._advance, batch, False)
            if self._auto_calls > 1:
                self._eager_times.append(dt)
            return metrics
        eager_out, dt = self._timed(self._advance, batch, False)  # this step's numbers unless compiled wins
        eager_s = min(self._eager_times + [dt])
        remaining = self.total_steps - self.step_count
        key = self.compile_key()
        records = CompileRecords()
        rec = records.get(key) or {}
        info = {"at_step": self.step_count, "eager_step_s": round(eager_s, 6), "remaining_steps": remaining,
                "record": bool(rec)}
        expected = (rec.get("warm_compile_s") or WARM_COMPILE_S) if rec else COLD_COMPILE_S
        slower_age = time.time() - rec.get("updated_at", 0.0) if rec.get("faster") is False else None
        retry = slower_age is not None and not rec.get("error") and slower_age >= RETRY_SLOWER_AFTER_S
        ratio = (rec["compiled_step_s"] / rec["eager_step_s"]
                 if rec.get("compiled_step_s") and rec.get("eager_step_s") and not retry else None)
        info["expected_compile_s"] = round(expected, 3)
        if remaining < AUTO_MIN_REMAINING:
            go, reason = False, f"job too short: {remaining} steps left (< {AUTO_MIN_REMAINING})"
        elif slower_age is not None and not retry:
            go, reason = False, ("this shape failed to compile before" if rec.get("error") else
                                 f"this shape's compiled step was measured slower than eager "
                                 f"{slower_age / 3600:.1f} h ago (measured again after "
                                 f"{RETRY_SLOWER_AFTER_S / 3600:.0f} h)")
        elif ratio is not None:
            saving = remaining * eager_s * max(0.0, 1.0 - ratio)
            go = saving >= REPAY_KNOWN * expected
            reason = (f"saving {saving:.1f} s ({remaining} steps x {eager_s * 1e3:.2f} ms x (1 - {ratio:.2f})) "
                      f"{'>=' if go else '<'} {REPAY_KNOWN} x expected compile {expected:.1f} s")
        else:
            left = remaining * eager_s
            go = left >= REPAY_UNKNOWN * expected
            reason = (f"eager time left {left:.1f} s ({remaining} steps x {eager_s * 1e3:.2f} ms) "
                      f"{'>=' if go else '<'} {REPAY_UNKNOWN} x expected compile {expected:.1f} s")
            if retry:
                reason = f"compiled step measured slower {slower_age / 86400:.0f} days ago, measuring again: {reason}"
        self._compile_decided = True
        if not go:
            self.compile_info.update(decision="eager", reason=reason, **info)
            self.meta, self.outer_state, metrics = eager_out
            return metrics
        hvp = self.algorithm.__dict__.get("hvp")  # the compiled paths switch Hessian-vector products to reverse
        before = cache_counters()
        try:
            out, compile_s = self._timed(self._advance, batch, True)
            out, t1 = self._timed(self._advance, batch, True)
            out, t2 = self._timed(self._advance, batch, True)
        except Exception as e:  # a graph torch cannot compile: stay eager, and do not try this shape again
            self._drop_compiled(hvp)
            err = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            records.put(key, faster=False, error=err)
            self.compile_info.update(decision="eager", reason=f"compile failed ({err})", **info)
            self.meta, self.outer_state, metrics = eager_out
            return metrics
        compiled_s = min(t1, t2)
        cache = counters_delta(before, cache_counters())
        cold = bool(cache["fxgraph_miss"] or cache["aot_miss"])
        keep = compiled_s < eager_s
        records.put(key, faster=keep, error=None, eager_step_s=eager_s, compiled_step_s=compiled_s,
                    **{("cold_compile_s" if cold else "warm_compile_s"): compile_s})
        self._compile_timed = True
        info.update(compile_s=round(compile_s, 3), compiled_step_s=round(compiled_s, 6), cache=cache,
                    cache_hit=not cold)
        if keep:
            self.compiled = True
            self.compile_info.update(decision="compiled", reason=reason, **info)
            self.meta, self.outer_state, metrics = out
        else:
            self._drop_compiled(hvp)
            self.compile_info.update(decision="eager", reason=f"{reason}; compiled step {compiled_s * 1e3:.2f} ms "
                                     f"not faster than eager {eager_s * 1e3:.2f} ms", **info)
            self.meta, self.outer_state, metrics = eager_out
        return metrics

    def _drop_compiled(self, hvp):
        """Back to the eager path after a compile trial: the compiled functions go, and the algorithm's
        Hessian-vector products are what they were (the eager numbers stay those of an uncompiled job)."""
        for k in [k for k in self._fns if k[0] == "fused" or k[1] is True]:
            del self._fns[k]
        if hvp is None:
            self.algorithm.__dict__.pop("hvp", None)
        else:
            self.algorithm.hvp = hvp
        self.compiled = False

    def reduce(self, deltas, metrics):
        """Per-task updates -> the meta-batch's update: the finite tasks' mean, then global-norm clipping."""
        return clip_delta(*reduce_tasks(deltas, metrics), self.config["outer"].get("clip_grad_norm"))

    def apply(self, delta: dict):
        """The outer update with separate learning rates for phi and log sigma^2."""
        self.meta, self.outer_state = self.outer_update(self.meta, self.outer_state, delta, self.lr_factor())

    def outer_update(self, meta: dict, outer_state: dict, delta: dict, f):
        """Pure outer update: (meta, outer_state) -> new (meta, outer_state); ``f`` scales every learning rate
        (a float, or a 0-dim tensor under torch.compile so that a schedule does not recompile)."""
        outer = self.config["outer"]
        meta, outer_state = dict(meta), dict(outer_state)
        meta["phi"], outer_state["phi"] = self.outer.update(
            delta["phi"], outer_state["phi"], meta["phi"], lr=outer["lr_phi"] * f)
        if self.algorithm.learns_sigma:
            g = delta["log_sigma2"]
            beta = self.config["algorithm"]["ig_beta"]
            if beta > 0:
                g = g + grad(inverse_gamma_penalty)(meta["log_sigma2"], beta)
            new, outer_state["log_sigma2"] = self.outer.update(
                {"log_sigma2": g}, outer_state["log_sigma2"], {"log_sigma2": meta["log_sigma2"]},
                lr=outer["lr_log_sigma2"] * f)
            meta["log_sigma2"] = new["log_sigma2"].clamp(LOG_SIGMA2_MIN, LOG_SIGMA2_MAX)
        if "extra" in meta:
            lr = outer.get("lr_extra") or outer["lr_phi"]
            new, outer_state["extra"] = self.outer.update(
                delta["extra"], outer_state["extra"], meta["extra"], lr=lr * f)
            meta["extra"] = self.algorithm.project_extra(new)
        return meta, outer_state

    def run(self, steps: int | None = None, callback=None):
        """Meta-train to ``total_steps`` (or ``steps`` more); ``callback(step, metrics)`` may return True to stop."""
        end = self.total_steps if steps is None else min(self.total_steps, self.step_count + steps)
        metrics = {}
        while self.step_count < end:
            metrics = self.step()
            if callback is not None and callback(self.step_count, metrics):
                break
        return metrics

    # ------------------------------------------------------------------ views
    def sigma2(self):
        return sigma2(self.meta["log_sigma2"])

    def meta_model(self):
        from .adapt import MetaModel
        extra = {k: v.detach().clone() for k, v in self.meta.get("extra", {}).items()}
        return MetaModel(self.config, {k: v.detach().clone() for k, v in self.meta["phi"].items()},
                         self.meta["log_sigma2"].detach().clone(), device=self.device, extra=extra or None)

    def module_map(self):
        return self.meta_model().module_map()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self):
        """(tensors, metadata): flat tensors ready for safetensors plus JSON-able metadata."""
        tensors = {f"phi.{k}": v for k, v in self.meta["phi"].items()}
        tensors["log_sigma2"] = self.meta["log_sigma2"]
        tensors.update({f"extra.{k}": v for k, v in self.meta.get("extra", {}).items()})
        tensors.update(flatten_state(self.outer_state, "outer"))
        tensors["rng"] = self.generator.get_state()
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        meta = {"version": STATE_VERSION, "step": self.step_count, "vectorize": self.vectorize,
                "modules": list(self.partition.names)}
        if self.compile_setting == "auto" and self._compile_decided and self.comm is None:
            meta["compiled"] = self.compiled  # execution.compile "auto"'s decision: a resumed job keeps it
        return tensors, meta

    def load_state_dict(self, tensors: dict, meta: dict):
        if meta.get("version") != STATE_VERSION:
            raise ValueError(f"checkpoint version {meta.get('version')} != {STATE_VERSION}")
        dev = self.device
        self.meta["phi"] = {k: tensors[f"phi.{k}"].to(dev, self.dtype) for k in self.meta["phi"]}
        self.meta["log_sigma2"] = tensors["log_sigma2"].to(dev, self.dtype)
        if "extra" in self.meta:
            self.meta["extra"] = {k: tensors[f"extra.{k}"].to(dev, self.dtype) for k in self.meta["extra"]}
        self.outer_state = {k: unflatten_state(v, {n: t.to(dev) for n, t in tensors.items()}, f"outer.{k}")
                            for k, v in self.outer_state.items()}
        self.generator.set_state(tensors["rng"].clone())
        self.step_count = int(meta["step"])
        if meta.get("vectorize") in ("vmap", "loop"):
            self.vectorize = meta["vectorize"]
        if self.compile_setting == "auto" and self.comm is None and isinstance(meta.get("compiled"), bool):
            self.compiled, self._compile_decided = meta["compiled"], True
            self.compile_info.update(decision="compiled" if self.compiled else "eager",
                                     reason="decided before the checkpoint this job resumed from")
