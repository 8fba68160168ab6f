"""Compile once per job shape (issue 14 item 3): job 1 on a cold compile cache, job 2 of the same shape on the
cache job 1 left, each in a fresh process (as a new job on a restarted worker).

    PYTHONPATH=. python benchmarks/compile_cache.py                 # every case (~12 min on 2 shared cores)
    PYTHONPATH=. python benchmarks/compile_cache.py --cases sinusoid conv4 --no-write

Cases (each a sequence of fresh processes sharing one new cache directory, TORCHINDUCTOR_CACHE_DIR):

- ``sinusoid``: ``execution.compile: true``, vmap (the whole meta-step compiled), MAML 5 inner steps, meta-batch 25,
  MLP 1-40-40-1 (benchmarks/core_bench.py's sinusoid row). Job 1 cold, job 2 warm; 1 + 30 steps each.
- ``conv4``: ``execution.compile: true``, loop (one task's update compiled), MAML 1 inner step, Omniglot-shaped
  5-way 1-shot 15 queries 28x28 (random pixels: the work depends on shapes only), meta-batch 32. Job 1 cold (the
  bounded conv4 compile time), job 2 warm; 1 + 5 steps each.
- ``auto-sinusoid``: a whole 10,000-step job with every other field at its default (MAML, MLP 40-40, meta-batch
  25, 5 inner steps): ``compile: false``, then ``"auto"`` on a cold cache, then ``"auto"`` on the warm one.
- ``auto-conv4``: the conv4 shape as a long job (60,000 steps, ``"auto"``): the first 8 steps of job 1 (cold: the
  decision compiles, measures the compiled step against the eager one and keeps the faster) and of job 2 (reads
  job 1's record).

Per job: ``import_s`` (import torch and core), ``build_s`` (MetaTrainer), ``first_step_s``, ``ttfs_s`` = build +
first step (what the service reports as time to first step, minus the worker's claim and database work),
``compile_s`` / ``cache_hit`` / decision from ``MetaTrainer.compile_info``, the steady step (median of the last
half of the steps) and, for whole jobs, ``job_s``. Writes the "Compile cache" section of benchmarks/RESULTS.md.
"""
from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.machine import RESULTS, write_section  # noqa: E402

SECTION = "## Compile cache"
SOURCE_ID = "compile-cache-random"


def sinusoid_cfg(compile, steps=1000, defaults=False) -> dict:
    body = {"algorithm": {"name": "maml"}, "model": {"arch": "mlp", "hidden": [40, 40]},
            "tasks": {"family": "sinusoid", "shots": 10, "query": 10}, "inner": {"steps": 5},
            "outer": {"meta_batch": 25, "steps": steps},
            "execution": {"vectorize": "vmap", "compile": compile, "device": "cpu"}}
    if defaults:  # only what a user names, the rest at the schema defaults (vectorize "auto", compile as given)
        body = {"algorithm": {"name": "maml"}, "model": {"arch": "mlp"}, "tasks": {"family": "sinusoid"},
                "outer": {"steps": steps}, "execution": {"compile": compile, "device": "cpu"}}
    return body


def conv4_cfg(compile, steps=1000) -> dict:
    return {"algorithm": {"name": "maml"}, "model": {"arch": "conv4"},
            "tasks": {"family": "image_classes", "source": "dataset", "dataset_id": SOURCE_ID, "ways": 5,
                      "shots": 1, "query": 15, "image_size": 28},
            "inner": {"steps": 1, "lr": 0.4}, "outer": {"meta_batch": 32, "steps": steps},
            "execution": {"vectorize": "loop", "compile": compile, "device": "cpu"}}


# --------------------------------------------------------------------------- one job, in this process
def child(spec: dict) -> dict:
    import torch

    from core.tasks import register_source
    from core.trainer import MetaTrainer
    from schemas.job import JobConfig
    imported = time.perf_counter() - _T0
    torch.set_num_threads(spec["threads"])

    def images(_cfg):
        g = torch.Generator().manual_seed(0)
        return {"images": torch.randint(0, 256, (60, 20, 28, 28), generator=g, dtype=torch.uint8),
                "groups": list(range(60))}
    register_source("dataset", images)

    cfg = JobConfig.model_validate(spec["config"]).model_dump()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    tr = MetaTrainer(cfg)
    build = time.perf_counter() - t0
    n = spec["steps"] or tr.total_steps
    times, compiled_ready = [], None
    for _ in range(n):
        t = time.perf_counter()
        tr.step()
        times.append(time.perf_counter() - t)
        if compiled_ready is None and tr.compiled and tr.compile_info.get("compile_s") is not None:
            compiled_ready = time.perf_counter() - t0
    job = time.perf_counter() - t0
    tail = times[len(times) // 2:] if len(times) > 1 else times
    info = {k: v for k, v in tr.compile_info.items() if k != "reason"}
    return {"import_s": round(imported, 2), "build_s": round(build, 3), "first_step_s": round(times[0], 3),
            "ttfs_s": round(build + times[0], 3), "steps": n, "steady_step_ms": round(statistics.median(tail) * 1e3, 3),
            "job_s": round(job, 2), "compiled_ready_s": None if compiled_ready is None else round(compiled_ready, 2),
            "compile": info, "reason": tr.compile_info.get("reason"), "vectorize": tr.vectorize,
            "load1_start": round(load0, 2), "load1_end": round(os.getloadavg()[0], 2)}


def run_child(spec: dict, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=env, cwd=str(ROOT))
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = round(time.perf_counter() - t0, 2)
    return out


CASES = {
    "sinusoid": [("job 1 (cold)", sinusoid_cfg(True), 31), ("job 2 (warm)", sinusoid_cfg(True), 31)],
    "conv4": [("job 1 (cold)", conv4_cfg(True), 6), ("job 2 (warm)", conv4_cfg(True), 6)],
    "auto-sinusoid": [("compile: false", sinusoid_cfg(False, 10_000, defaults=True), 0),
                      ("auto, cold cache", sinusoid_cfg("auto", 10_000, defaults=True), 0),
                      ("auto, warm cache", sinusoid_cfg("auto", 10_000, defaults=True), 0)],
    "auto-conv4": [("job 1 auto (cold)", conv4_cfg("auto", 60_000), 8),
                   ("job 2 auto (record)", conv4_cfg("auto", 60_000), 8)],
}


def run_case(name: str, threads: int) -> list:
    cache = tempfile.mkdtemp(prefix=f"compile_cache_{name}_")
    rows = []
    for label, cfg, steps in CASES[name]:
        r = run_child({"config": cfg, "steps": steps, "threads": threads}, cache)
        row = {"case": name, "job": label, **r}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# --------------------------------------------------------------------------- report
def _f(v, nd=2):
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(rows: list, info: dict, cmd: str) -> str:
    L = [SECTION, "",
         f"`{cmd}` (benchmarks/compile_cache.py). Machine: {info['cpu']}, {info['cores']} cores, {info['threads']} "
         f"torch threads, torch {info['torch']}, commit {info['commit']}, {info['date']}; shared with other "
         "benchmarks (1-minute load average at each job's start and end beside it). Every job is a fresh process; "
         "the jobs of a case share one new compile cache directory (TORCHINDUCTOR_CACHE_DIR), as the jobs of one "
         "worker host share `<data_dir>/compile-cache`. ttfs = building the trainer + the first meta-step (the "
         "service's `startup.time_to_first_step_s` adds the claim and database work); compile = the first compiled "
         "call (compile or cache load, plus one step); steady = median step of the job's second half.", "",
         "| case | job | import s | ttfs s | compile s | cache hit | decision | steady ms | job s | load1 |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            L.append(f"| {r['case']} | {r['job']} | error: {r['error']} | | | | | | | |")
            continue
        c = r["compile"]
        job_s = _f(r["job_s"]) if r["case"].startswith("auto-sinusoid") else "—"
        L.append(f"| {r['case']} | {r['job']} | {_f(r['import_s'])} | {_f(r['ttfs_s'])} | {_f(c.get('compile_s'))} | "
                 f"{_f(c.get('cache_hit'))} | {c.get('decision')} | {_f(r['steady_step_ms'])} | {job_s} | "
                 f"{r['load1_start']}-{r['load1_end']} |")
    L += [""]
    for case in ("sinusoid", "conv4", "auto-conv4"):
        pair = [r for r in rows if r["case"] == case and "error" not in r]
        if len(pair) == 2 and all(r.get("compiled_ready_s") for r in pair):
            a, b = (r["compiled_ready_s"] for r in pair)
            L.append(f"- {case}: the second job of the shape runs compiled {b:.1f} s after its trainer is built, the "
                     f"first {a:.1f} s ({a / b:.1f}x); its compile {pair[1]['compile'].get('compile_s')} s, from the "
                     f"cache (hit: {pair[1]['compile'].get('cache_hit')}), against {pair[0]['compile'].get('compile_s')} s.")
    jobs = {r["job"]: r for r in rows if r["case"] == "auto-sinusoid" and "error" not in r}
    if len(jobs) == 3:
        e, c, w = (jobs[k]["job_s"] for k in ("compile: false", "auto, cold cache", "auto, warm cache"))
        L.append(f"- auto-sinusoid: the whole 10,000-step job with the defaults took {e:.1f} s eager, {c:.1f} s with "
                 f"\"auto\" on a cold cache ({e / c:.1f}x), {w:.1f} s on a warm one ({e / w:.1f}x).")
    reasons = [(r["case"], r["job"], r["reason"]) for r in rows if r.get("reason") and r["case"].startswith("auto")]
    if reasons:
        L += ["", "The \"auto\" decisions, as the jobs report them (`startup.compile.reason`):", ""]
        L += [f"- {c}, {j}: {why}" for c, j, why in reasons]
    return "\n".join(L) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads per job (default 2)")
    ap.add_argument("--no-write", action="store_true", help="do not touch benchmarks/RESULTS.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--render", help=argparse.SUPPRESS)  # JSON {"rows", "info", "cmd"}: the section from a past run
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    if a.render:
        d = json.loads(Path(a.render).read_text())
        md = markdown(d["rows"], d["info"], d["cmd"])
        print(md)
        if not a.no_write:
            write_section(md)
        return
    import platform

    import torch

    from benchmarks.machine import commit, cpu_name
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
            "python": platform.python_version(), "commit": commit(), "date": time.strftime("%Y-%m-%d %H:%M")}
    rows = [r for name in a.cases for r in run_case(name, a.threads)]
    cmd = "PYTHONPATH=. python benchmarks/compile_cache.py" + (
        "" if a.cases == list(CASES) else " --cases " + " ".join(a.cases)) + (
        "" if a.threads == 2 else f" --threads {a.threads}")
    md = markdown(rows, info, cmd)
    print(md)
    if not a.no_write:
        write_section(md)


if __name__ == "__main__":
    main()
