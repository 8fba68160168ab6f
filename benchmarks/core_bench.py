"""Core meta-training throughput and memory benchmark (issue 2, "Benchmarks (measured, not asserted)").

    PYTHONPATH=. python benchmarks/core_bench.py            # full run (~10 min on 2 cores)
    PYTHONPATH=. python benchmarks/core_bench.py --quick    # smoke run (~1-2 min)
    PYTHONPATH=. python benchmarks/core_bench.py --no-write # print only, leave RESULTS.md alone

Every number is a measurement of ``core.MetaTrainer.step()`` (sampling, per-task updates, mean, outer
update, metric read-out), built from a validated ``schemas.JobConfig``:

- sinusoid: mlp 1-40-40-1, meta-batch 25, 10 support / 10 query, 1, 5 and 100 inner steps; maml, sigma_maml,
  sigma_imaml, sigma_reptile; vmap vs loop; eager vs ``execution.compile`` (torch.compile, dynamic=False).
  Compile time = first step minus a steady step.
- conv4 5-way 1-shot, 15 queries per class, 28x28x1, meta-batch 32, 1 inner step: vmap vs loop, NCHW vs
  channels_last, eager vs compiled. The ``image_classes`` family reads a registered ``dataset`` source that
  this script fills with *random* uint8 images (60 classes x 20 instances): the amount of work per step
  depends on shapes only, never on pixel values, so random pixels time the same as Omniglot.
- peak memory against inner steps (1, 5, 25, 100) for sigma_imaml, sigma_reptile and sigma_maml (conv4,
  meta-batch 4, loop): peak RSS growth over the pre-step RSS (``VmHWM`` of /proc/self/status minus ``/proc/self/statm``
  resident before the first step) in a fresh subprocess per configuration.

Each throughput figure is the median of several steady steps after one warm-up step; the 1-minute load
average is printed with every result because the machine is shared with other CPU-heavy jobs.
Writes the "Core" section of benchmarks/RESULTS.md (other sections are kept) and prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if "--warm-cache" not in sys.argv and "--memory-child" not in sys.argv:
    # compile times are reported cold: a fresh Inductor/FX-graph cache for this run (set before torch loads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="core_bench_inductor_")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.tasks import register_source  # noqa: E402
from core.trainer import MetaTrainer  # noqa: E402
from schemas.job import JobConfig  # noqa: E402
from benchmarks.machine import commit as code_commit, cpu_name, write_section  # noqa: E402

SECTION = "## Core meta-training throughput and memory"
ALGS = ("maml", "sigma_maml", "sigma_imaml", "sigma_reptile")
TASK_THREADS = len(os.sched_getaffinity(0))
BENCH_SOURCE_ID = "core-bench-random"


# --------------------------------------------------------------------------- machine
def machine_info() -> dict:
    cpu, commit = cpu_name(), code_commit()
    return {"cpu": cpu, "cores": os.cpu_count(), "commit": commit, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def load1() -> float:
    return round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- configs
def _random_images(cfg: dict) -> dict:
    """60 classes x 20 instances of random 28x28 uint8 images (timing does not depend on pixel values)."""
    g = torch.Generator().manual_seed(0)
    return {"images": torch.randint(0, 256, (60, 20, 28, 28), generator=g, dtype=torch.uint8),
            "groups": list(range(60))}


register_source("dataset", _random_images)  # this process only: the benchmark's image source


def sinusoid_config(alg: str, steps: int, vectorize: str, compile: bool, meta_batch: int = 25) -> dict:
    return JobConfig.model_validate({
        "algorithm": {"name": alg}, "model": {"arch": "mlp", "hidden": [40, 40]},
        "tasks": {"family": "sinusoid", "shots": 10, "query": 10},
        "inner": {"steps": steps}, "outer": {"meta_batch": meta_batch},
        "execution": {"vectorize": vectorize, "compile": compile, "device": "cpu"}}).model_dump()


def conv4_config(alg: str, steps: int, vectorize: str, compile: bool, channels_last: bool,
                 meta_batch: int = 32) -> dict:
    return JobConfig.model_validate({
        "algorithm": {"name": alg}, "model": {"arch": "conv4", "channels_last": channels_last},
        "tasks": {"family": "image_classes", "source": "dataset", "dataset_id": BENCH_SOURCE_ID,
                  "ways": 5, "shots": 1, "query": 15, "image_size": 28},
        "inner": {"steps": steps, "lr": 0.4}, "outer": {"meta_batch": meta_batch},
        "execution": {"vectorize": vectorize, "compile": compile, "device": "cpu"}}).model_dump()


# --------------------------------------------------------------------------- throughput
def measure(cfg: dict, min_steps: int = 3, max_steps: int = 20, budget_s: float = 3.0, trainer_cls=MetaTrainer,
            warmup: bool = True):
    """One warm-up step (compilation included), then steady steps: at least ``min_steps``, more while the
    time spent stays under ``budget_s`` (at most ``max_steps``). Returns the median step.
    ``warmup=False`` (eager only, for very slow rows) times every step including the first."""
    if cfg["execution"]["compile"]:
        torch._dynamo.reset()  # new closures per trainer; do not hit the recompile limit of earlier runs
    # as a training worker builds it: the per-task loop on one thread per CPU (METASHRINK_TASK_THREADS default)
    trainer = trainer_cls(cfg, task_threads=TASK_THREADS) if trainer_cls is MetaTrainer else trainer_cls(cfg)
    first = None
    if warmup:
        t0 = time.perf_counter()
        trainer.step()
        first = time.perf_counter() - t0
    times = []
    while len(times) < min_steps or (len(times) < max_steps and sum(times) < budget_s):
        t0 = time.perf_counter()
        trainer.step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    mb = cfg["outer"]["meta_batch"]
    out = {"steps_per_s": round(1.0 / med, 3), "tasks_per_s": round(mb / med, 1), "step_ms": round(med * 1e3, 2),
           "min_step_ms": round(min(times) * 1e3, 2), "n": len(times),
           "first_step_s": None if first is None else round(first, 2),
           "load1": load1()}
    if cfg["execution"]["compile"]:
        out["compile_s"] = round(first - med, 2)
    return out


def run_case(label: str, cfg: dict, results: list, key: dict, **kw):
    try:
        r = measure(cfg, **kw)
    except Exception as e:  # report, never hide: a failed configuration is a result too
        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", "load1": load1()}
    row = {**key, **r}
    results.append(row)
    print(f"[{label}] {json.dumps(row)}", flush=True)
    return row


def sinusoid_suite(quick: bool, all_compiled: bool = False, eager: bool = True) -> list:
    rows = []
    steps_list = ((5,) if quick else (1, 5, 100)) if eager else ()
    for steps in steps_list:
        for alg in ALGS:
            for vec in ("vmap", "loop"):
                if quick and vec == "loop" and alg not in ("maml", "sigma_maml"):
                    continue
                budget = 1.5 if quick else 3.0
                slow = steps == 100 and vec == "loop"  # 2,500 unrolled per-task steps: ~10-60 s per meta-step
                run_case("sinusoid", sinusoid_config(alg, steps, vec, False), rows,
                         {"workload": "sinusoid", "alg": alg, "inner_steps": steps, "mode": vec, "compiled": False},
                         min_steps=1 if slow else (2 if steps == 100 else 3), budget_s=0 if slow else budget,
                         warmup=not slow)
    # compiled: vmap only (a compiled per-task loop unrolls meta_batch copies of the graph), and not at 100
    # inner steps (the unrolled graph takes minutes to compile on 2 cores)
    # cold compiles take 35-200 s each on 2 shared cores: the target rows by default, the rest on request
    compiled = [("maml", 5), ("sigma_maml", 5)]
    if all_compiled:
        compiled += [("sigma_reptile", 5), ("sigma_imaml", 5), ("maml", 1), ("sigma_maml", 1)]
    for alg, steps in compiled:
        run_case("sinusoid", sinusoid_config(alg, steps, "vmap", True), rows,
                 {"workload": "sinusoid", "alg": alg, "inner_steps": steps, "mode": "vmap", "compiled": True},
                 min_steps=5, max_steps=100, budget_s=1.0 if quick else 2.0)
    return rows


def conv4_suite(quick: bool, compile: bool = False) -> list:
    rows = []
    algs = ("maml", "sigma_maml") if quick else ALGS
    for alg in algs:
        for vec in ("loop", "vmap"):
            for cl in (False, True):
                if quick and alg != "maml" and (vec == "vmap" or not cl):
                    continue
                if vec == "vmap" and cl and alg != "maml":
                    continue  # fails for every algorithm alike (see the maml row); not repeated
                # eager vmap is ~10 s per meta-step here: time two steps without a separate warm-up
                slow = vec == "vmap"
                run_case("conv4", conv4_config(alg, 1, vec, False, cl), rows,
                         {"workload": "conv4", "alg": alg, "inner_steps": 1, "mode": vec,
                          "layout": "channels_last" if cl else "NCHW", "compiled": False},
                         min_steps=2 if (quick or slow) else 3, max_steps=6, budget_s=0 if slow else 3.0,
                         warmup=not slow)
    if compile:  # opt-in: each compiles for ~5 minutes on 2 shared cores
        for alg, vec, cl in [("maml", "loop", True), ("maml", "vmap", False)]:
            run_case("conv4", conv4_config(alg, 1, vec, True, cl), rows,
                     {"workload": "conv4", "alg": alg, "inner_steps": 1, "mode": vec,
                      "layout": "channels_last" if cl else "NCHW", "compiled": True},
                     min_steps=3, max_steps=6, budget_s=3.0)
    return rows


def threads_suite(quick: bool) -> list:
    """The same workloads at 1 and 2 intra-op threads (the machine is shared: oversubscription matters)."""
    rows = []
    before = torch.get_num_threads()
    try:
        for nt in (1, 2, 1, 2) if not quick else (1, 2):
            torch.set_num_threads(nt)
            run_case("threads", sinusoid_config("maml", 5, "vmap", False), rows,
                     {"workload": "sinusoid", "alg": "maml", "inner_steps": 5, "mode": "vmap", "compiled": False,
                      "threads": nt}, min_steps=3, budget_s=1.5)
            if not quick:
                run_case("threads", conv4_config("maml", 1, "loop", False, True), rows,
                         {"workload": "conv4", "alg": "maml", "inner_steps": 1, "mode": "loop",
                          "layout": "channels_last", "compiled": False, "threads": nt},
                         min_steps=3, max_steps=5, budget_s=3.0)
    finally:
        torch.set_num_threads(before)
    return rows


# --------------------------------------------------------------------------- memory (fresh subprocess each)
def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process's own high-water mark. Not ``ru_maxrss``: Linux carries it across execve, so a child
    spawned (vfork + exec) by a large parent reports the parent's peak. ``VmHWM`` belongs to the new mm."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(alg: str, steps: int, meta_batch: int) -> dict:
    torch.set_num_threads(1)
    trainer = MetaTrainer(conv4_config(alg, steps, "loop", False, False, meta_batch=meta_batch))
    batch = trainer.sample()
    before = _rss_bytes()
    deltas, metrics = trainer.task_updates(batch, "loop")
    peak = _peak_rss_bytes()
    return {"alg": alg, "inner_steps": steps, "baseline_mb": round(before / 2**20, 1),
            "peak_growth_mb": round(max(peak - before, 0) / 2**20, 2)}


def memory_suite(quick: bool) -> list:
    rows = []
    steps_list = (1, 25) if quick else (1, 5, 25, 100)
    for alg in ("sigma_imaml", "sigma_reptile", "sigma_maml"):
        for steps in steps_list:
            if alg == "sigma_maml" and steps not in (min(steps_list), max(steps_list)):
                continue  # the contrast (memory linear in steps) needs only the two ends
            cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", alg, str(steps), "4"]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT),
                               env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
            try:
                r = json.loads(p.stdout.strip().splitlines()[-1])
            except Exception:
                r = {"alg": alg, "inner_steps": steps, "error": (p.stderr or p.stdout)[-300:]}
            r["load1"] = load1()
            rows.append(r)
            print(f"[memory] {json.dumps(r)}", flush=True)
    for alg in ("sigma_imaml", "sigma_reptile", "sigma_maml"):
        rs = {r["inner_steps"]: r for r in rows if r["alg"] == alg and "error" not in r}
        lo, hi = min(steps_list), max(steps_list)
        if lo in rs and hi in rs:
            # ratio of total peak RSS (baseline + growth): what the 1.1x target is about
            a = rs[lo]["baseline_mb"] + rs[lo]["peak_growth_mb"]
            b = rs[hi]["baseline_mb"] + rs[hi]["peak_growth_mb"]
            g = rs[lo]["peak_growth_mb"]
            for r in rows:
                if r["alg"] == alg and r["inner_steps"] == hi:
                    r["peak_ratio_vs_1"] = round(b / a, 3)
                    r["growth_ratio_vs_1"] = round(rs[hi]["peak_growth_mb"] / g, 2) if g > 0 else None
    return rows


# Findings of one-off experiments on this machine (2026-11-22, load average 4-8 on 2 cores), kept with the
# tables because they explain them; the proposed core/ changes and their measurements are in the text.
FINDINGS = """### Why the slow paths are slow, and what measured faster

- **Intra-op threads.** On a shared 2-core machine two intra-op threads measured 4-7x *slower* than one
  under load 4-8 (OpenMP workers spin and wait for a core that another process holds), so rows here run with
  1 intra-op thread (`--threads`) and the workers default to 1 (`METASHRINK_TORCH_THREADS`). The per-task
  loop gets its parallelism from task threads instead (`METASHRINK_TASK_THREADS`, one per CPU, each with one
  intra-op thread, so no OpenMP team waits on a busy core).
- **Per-task loop (sinusoid).** 12-16x slower than vmap: each of the 25 tasks pays the full Python and
  torch.func dispatch for every tiny op of every inner step; 100 inner steps take 2.5-7 s per meta-step.
  ``vectorize: auto`` picks vmap here; the loop only pays for conv4.
- **Eager vmap (sinusoid).** 5-step MAML ran 43-59 meta-steps/s (two runs on the current core, load 5-6),
  sigma-MAML 32-35. Every op runs through two or three functorch layers (grad / vmap / grad); a hand-batched rewrite of the same 5-step second-order MAML step (task-batched parameters with `baddbmm`
  and plain `torch.autograd.grad(create_graph=True)`, same meta-gradient to 6e-8) ran 2.0x faster by median
  and 3-4x by best step (16.8 vs 8.2 meta-steps/s at load 8.5): the eager path is dispatch-bound.
- **torch.compile (sinusoid).** Steady steps reach 2.3-3.8 ms, but cold compiles took 36-200 s under
  this load (issue 2 measured 10-32 s on a quiet machine), and the median swings 2-3x with the load (the
  same MAML row: 154/s at load 6.0, 342/s at load 5.0). sigma-MAML misses 300/s because ~30 eager ops
  run around the compiled per-task graph every step (two Adam updates, the inverse-Gamma gradient, the
  clamp, the mean over tasks). Compiling the *whole* meta-step (per-task updates + mean + outer update +
  metric means) as one graph (proposed `MetaTrainer` change) measured, cold cache: sigma-MAML 410
  meta-steps/s (2.44 ms median, 2.23 best, compile 72 s, load 4.1) against 119-262/s for the current
  code (8.43/3.82 ms median, 3.78/3.39 best, load 5.5/5.7); MAML 386/s (2.59 ms, load 5.4) against
  342-402/s (no gain: MAML's outer update is small). Same parameters as eager within 3e-8.
- **conv4.** Compute-bound: a meta-step is ~40 GFLOP, dominated by the 75 query images per task (the
  [75, 64, 14, 14] activations of the first two layers: their convolution backward, batch-norm and ReLU passes).
  What made the per-task loop faster than the peers (1 inner step: 1.35x MAML and 1.45x sigma-MAML eager,
  1.57x and 1.75x compiled; benchmarks/peers.py, "Peers", at 01f9ff5): tasks on parallel threads with one
  intra-op thread each (two tasks at once on two cores beat one task on both), plain autograd instead of
  torch.func's grad of grad in each task (that form took 1.22x the loop peers' time at fa28324), channels-last
  memory (now the default), and the one-channel first layer as im2col + one addmm (oneDNN's 1-channel
  convolution is slow per FLOP on CPU). vmap turns per-task weights into grouped convolutions and stays slower
  than the loop. Compiling conv4 now compiles one task's update (34-35 s cold, ~3 s from the cache; "Compile
  cache").
- **Memory.** sigma-iMAML and sigma-Reptile adapt without keeping a graph: peak growth is flat in the
  number of inner steps; sigma-MAML's grows linearly (it backpropagates through the unrolled steps).
"""


# --------------------------------------------------------------------------- report
def _best(rows, **match):
    ok = [r for r in rows if "error" not in r and all(r.get(k) == v for k, v in match.items())]
    return max(ok, key=lambda r: r["steps_per_s"]) if ok else None


def targets(sin, conv, mem) -> list:
    out = []
    for alg in ("maml", "sigma_maml"):
        c = _best(sin, alg=alg, inner_steps=5, compiled=True)
        e = _best(sin, alg=alg, inner_steps=5, compiled=False)
        out.append((f"sinusoid 5-step {alg} compiled >= 300 meta-steps/s",
                    c["steps_per_s"] if c else None, bool(c and c["steps_per_s"] >= 300)))
        out.append((f"sinusoid 5-step {alg} eager >= 50 meta-steps/s",
                    e["steps_per_s"] if e else None, bool(e and e["steps_per_s"] >= 50)))
    b = _best(conv, alg="maml")
    out.append(("conv4 5-way 1-shot MAML mb 32, 1 step >= 1.5 meta-steps/s (fastest variant)",
                b["steps_per_s"] if b else None, bool(b and b["steps_per_s"] >= 1.5)))
    for alg in ("sigma_imaml", "sigma_reptile"):
        r = [x for x in mem if x["alg"] == alg and "peak_ratio_vs_1" in x]
        v = r[0]["peak_ratio_vs_1"] if r else None
        out.append((f"{alg} peak memory 100 vs 1 inner steps <= 1.1x", v, bool(v is not None and v <= 1.1)))
    return out


def _fmt(v):
    return "-" if v is None else (f"{v:g}" if isinstance(v, (int, float)) else str(v))


def markdown(info, sin, conv, thr, mem, tg, quick, wall) -> str:
    L = [SECTION, "",
         f"`PYTHONPATH=. python benchmarks/core_bench.py{' --quick' if quick else ''}` "
         f"(whole `MetaTrainer.step()`, median of steady steps after one warm-up; load1 = 1-minute load "
         f"average when the row finished; the machine was shared with other CPU-heavy jobs, so 'best ms', the "
         f"fastest steady step, is the closer estimate of an unshared machine; targets use the median).", "",
         f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, Python {info['python']}, "
         f"intra-op threads {info['threads']} (set by `--threads`), per-task loop threads {TASK_THREADS} (one per "
         f"CPU, as a training worker runs it), load average at start "
         f"{info['loadavg_start']}; code at commit {info.get('commit')}; measured {info['date']}; "
         f"run took {wall:.0f} s.", "",
         "### Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
    for name, v, ok in tg:
        L.append(f"| {name} | {_fmt(v)} | {'yes' if ok else 'no'} |")
    L += ["", "### Sinusoid (mlp 1-40-40-1, meta-batch 25, 10 support / 10 query)", "",
          "| algorithm | inner steps | mode | compiled | meta-steps/s | tasks/s | step ms | best ms | compile s | n | load1 |",
          "|---|---:|---|:---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in sin:
        if "error" in r:
            L.append(f"| {r['alg']} | {r['inner_steps']} | {r['mode']} | {'yes' if r['compiled'] else 'no'} | "
                     f"error: {r['error']} | | | | | | {r['load1']} |")
            continue
        L.append(f"| {r['alg']} | {r['inner_steps']} | {r['mode']} | {'yes' if r['compiled'] else 'no'} | "
                 f"{r['steps_per_s']:.3g} | {r['tasks_per_s']:.4g} | {r['step_ms']:.1f} | {r['min_step_ms']:.1f} | "
                 f"{_fmt(r.get('compile_s'))} | {r['n']} | {r['load1']} |")
    L += ["", "### Conv4 5-way 1-shot (28x28x1, 15 queries/class, meta-batch 32, 1 inner step)", "",
          "Random uint8 images through the real `image_classes` family (registered `dataset` source); speed "
          "depends on shapes, not pixel values.", "",
          "| algorithm | mode | layout | compiled | meta-steps/s | tasks/s | step ms | best ms | compile s | n | load1 |",
          "|---|---|---|:---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in conv:
        if "error" in r:
            L.append(f"| {r['alg']} | {r['mode']} | {r['layout']} | {'yes' if r['compiled'] else 'no'} | "
                     f"error: {r['error']} | | | | | | {r['load1']} |")
            continue
        L.append(f"| {r['alg']} | {r['mode']} | {r['layout']} | {'yes' if r['compiled'] else 'no'} | "
                 f"{r['steps_per_s']:.2f} | {r['tasks_per_s']:.1f} | {r['step_ms']:.0f} | {r['min_step_ms']:.0f} | "
                 f"{_fmt(r.get('compile_s'))} | {r['n']} | {r['load1']} |")
    if thr:
        L += ["", "### Intra-op threads (shared 2-core machine)", "",
              "| workload | threads | meta-steps/s | step ms | n | load1 |", "|---|---:|---:|---:|---:|---:|"]
        for r in thr:
            if "error" not in r:
                L.append(f"| {r['workload']} {r['alg']} {r['mode']} {r.get('layout', '')} | {r['threads']} | "
                         f"{r['steps_per_s']:.2f} | {r['step_ms']:.1f} | {r['n']} | {r['load1']} |")
    L += ["", "### Peak memory against inner steps (conv4, meta-batch 4, loop, one meta-step's task updates)", "",
          "Fresh subprocess per row; growth = peak RSS (`VmHWM`; not `ru_maxrss`, which Linux carries over "
          "from the spawning parent across exec) minus resident memory before the step; "
          "ratio = total peak RSS at the largest step count over that at 1 step.", "",
          "| algorithm | inner steps | baseline MB | peak growth MB | peak ratio vs 1 step | growth ratio | load1 |",
          "|---|---:|---:|---:|---:|---:|---:|"]
    for r in mem:
        if "error" in r:
            L.append(f"| {r['alg']} | {r['inner_steps']} | error | | | | {r['load1']} |")
            continue
        L.append(f"| {r['alg']} | {r['inner_steps']} | {r['baseline_mb']} | {r['peak_growth_mb']} | "
                 f"{_fmt(r.get('peak_ratio_vs_1'))} | {_fmt(r.get('growth_ratio_vs_1'))} | {r['load1']} |")
    L += ["", FINDINGS.rstrip("\n")]
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer configurations and steps")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: fastest measured on this shared 2-core machine)")
    ap.add_argument("--no-write", action="store_true", help="do not touch benchmarks/RESULTS.md")
    ap.add_argument("--conv4-compile", action="store_true",
                    help="also time torch.compile on conv4 (each compile takes ~5 min on 2 shared cores)")
    ap.add_argument("--all-compiled", action="store_true",
                    help="also compile sinusoid sigma_reptile/sigma_imaml (5 steps) and maml/sigma_maml (1 step)")
    ap.add_argument("--warm-cache", action="store_true",
                    help="reuse the default Inductor cache (compile times then are not cold)")
    ap.add_argument("--only", nargs="*", choices=("sinusoid", "sinusoid_compiled", "conv4", "threads", "memory"),
                    help="run only these parts (sinusoid_compiled: the compiled sinusoid rows alone)")
    ap.add_argument("--memory-child", nargs=3, metavar=("ALG", "STEPS", "META_BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.memory_child:
        alg, steps, mb = args.memory_child
        print(json.dumps(memory_child(alg, int(steps), int(mb))))
        return
    torch.set_num_threads(args.threads)
    only = set(args.only or ("sinusoid", "conv4", "threads", "memory"))
    info = machine_info()
    print(json.dumps({"machine": info}), flush=True)
    t0 = time.perf_counter()
    sin = sinusoid_suite(args.quick, args.all_compiled) if "sinusoid" in only else \
        sinusoid_suite(args.quick, args.all_compiled, eager=False) if "sinusoid_compiled" in only else []
    conv = conv4_suite(args.quick, args.conv4_compile) if "conv4" in only else []
    thr = threads_suite(args.quick) if "threads" in only else []
    mem = memory_suite(args.quick) if "memory" in only else []
    wall = time.perf_counter() - t0
    tg = targets(sin, conv, mem)
    md = markdown(info, sin, conv, thr, mem, tg, args.quick, wall)
    print(md)
    if not args.no_write:
        write_section(md)
    print(json.dumps({"machine": info, "wall_s": round(wall, 1), "sinusoid": sin, "conv4": conv, "threads": thr,
                      "memory": mem, "targets": [{"target": n, "measured": v, "met": ok} for n, v, ok in tg]}))


if __name__ == "__main__":
    main()
