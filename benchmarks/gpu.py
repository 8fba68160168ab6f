"""The GPU check in one command (issue 13 item 4): the CUDA tests, then conv4 5-way 1-shot meta-training throughput
on the GPU, appended with the date and the machine to benchmarks/RESULTS.md ("## GPU" section; earlier runs kept).

    benchmarks/gpu.sh                 # on a machine with a CUDA device: tests + benchmarks, appends to RESULTS.md
    benchmarks/gpu.sh --dry-run       # anywhere: every CPU-side part (tests run and skip, the benchmark rows run on
                                      # CPU with a tiny meta-batch), prints the markdown, writes nothing
    benchmarks/gpu.sh --no-write      # measure, print, leave RESULTS.md alone

Without a CUDA device and without --dry-run it still runs the tests (they report as skipped), says so, writes
nothing and exits with code 2.

Benchmarks: ``core.MetaTrainer.step()`` (sampling, per-task updates, mean, outer update, metrics read back, which
synchronises the device) for maml and sigma_maml, conv4 (64 channels, strided), 5-way 1-shot, 15 queries per class,
28x28x1, meta-batch 32, 1 inner step (Finn et al.'s Omniglot setting; benchmarks/core_bench.py's CPU rows), per
task loop and vmap, float32 with and without ``execution.amp`` (bf16 convolutions). Images: Omniglot's shape filled
with random pixels (core_bench's registered source: the work per step depends on shapes only). Median of steady
steps after one warm-up step; peak CUDA memory per row.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## GPU (benchmarks/gpu.sh)"
TESTS = ["tests/test_core_cuda.py", "tests/test_core_amp.py"]
ALGS = ("maml", "sigma_maml")


def machine(cuda: bool) -> dict:
    from benchmarks.core_bench import machine_info  # here, not at import (core_bench registers a data source)
    info = {**machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "host": socket.gethostname(),
            "torch_cuda": torch.version.cuda, "cuda": cuda}
    if cuda:
        p = torch.cuda.get_device_properties(0)
        info.update({"gpu": p.name, "gpu_count": torch.cuda.device_count(), "capability": f"{p.major}.{p.minor}",
                     "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                     "bf16": torch.cuda.is_bf16_supported(), "cudnn": torch.backends.cudnn.version()})
        if shutil.which("nvidia-smi"):
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
            info["driver"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    return info


def run_tests() -> dict:
    """pytest on the CUDA and amp tests in a subprocess; counts from its JUnit XML, failures by name."""
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                            f"--junitxml={xml}", *TESTS], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        wall = time.perf_counter() - t0
        out = {"cmd": f"python -m pytest {' '.join(TESTS)}", "exit_code": p.returncode, "wall_s": round(wall, 1),
               "tail": p.stdout.strip().splitlines()[-1:] or p.stderr.strip().splitlines()[-1:]}
        if not xml.exists():
            return {**out, "error": (p.stdout + p.stderr)[-2000:]}
        suites = ET.parse(xml).getroot()
        suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        failed = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
        reasons = sorted({s.get("message", "") for s in suite.iter("skipped")})
    return {**out, **n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"], "failed": failed,
            "skip_reasons": reasons}


def bench(device: str, dry: bool) -> list:
    # here, not at import: core_bench registers its random-image source and a fresh Inductor cache for this process
    from benchmarks.core_bench import conv4_config, measure
    rows = []
    meta_batch = 2 if dry else 32
    modes = ("loop",) if dry else ("loop", "vmap")
    for alg in ALGS:
        for mode in modes:
            for amp in (False, True):
                cfg = conv4_config(alg, 1, mode, False, False, meta_batch=meta_batch)
                cfg["execution"].update({"device": device, "amp": amp})
                key = {"alg": alg, "mode": mode, "amp": amp, "meta_batch": meta_batch, "device": device}
                if device == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    r = measure(cfg, min_steps=1 if dry else 5, max_steps=2 if dry else 50,
                                budget_s=0 if dry else 5.0)
                    if device == "cuda":
                        r["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
                except Exception as e:  # a failing configuration is a result too
                    r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                row = {**key, **r}
                rows.append(row)
                print(f"[gpu-bench] {json.dumps(row)}", flush=True)
    return rows


def markdown(info: dict, tests: dict, rows: list, dry: bool) -> str:
    where = (f"{info.get('gpu')} x{info.get('gpu_count')} (compute {info.get('capability')}, "
             f"{info.get('gpu_memory_gib')} GiB, bf16 {info.get('bf16')}, driver {info.get('driver')}, "
             f"cuDNN {info.get('cudnn')})" if info["cuda"] else "no CUDA device")
    if dry:
        where += "; dry run: benchmark rows on CPU, meta-batch 2"
    L = [f"### {info['date']}: {where}", "",
         f"Host {info['host']}, {info['cpu']}, {info['cores']} cores; torch {info['torch']} (CUDA "
         f"{info['torch_cuda']}), Python {info['python']}; code at commit {info['commit']}; "
         f"`benchmarks/gpu.sh{' --dry-run' if dry else ''}`.", ""]
    if "error" in tests:
        L += [f"CUDA tests: pytest did not report (exit code {tests['exit_code']}):", "", "```",
              tests["error"].strip(), "```", ""]
    else:
        L += [f"CUDA tests (`{tests['cmd']}`, {tests['wall_s']} s): {tests['passed']} passed, "
              f"{tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped."]
        if tests["failed"]:
            L += ["Failed: " + ", ".join(f"`{f}`" for f in tests["failed"])]
        if tests["skipped"] and tests["skip_reasons"]:
            L += ["Skipped because: " + "; ".join(tests["skip_reasons"])]
        L += [""]
    L += [f"Conv4 5-way 1-shot, 28x28x1 (random pixels), 15 queries/class, meta-batch {rows[0]['meta_batch'] if rows else '-'}, "
          "1 inner step, float32; median of steady `MetaTrainer.step()` after one warm-up:", "",
          "| algorithm | mode | amp | meta-steps/s | tasks/s | step ms | best ms | n | peak MiB |",
          "|---|---|:---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        amp = "bf16" if r["amp"] else "off"
        if "error" in r:
            L.append(f"| {r['alg']} | {r['mode']} | {amp} | error: {r['error']} | | | | | |")
        else:
            L.append(f"| {r['alg']} | {r['mode']} | {amp} | {r['steps_per_s']:.3g} | {r['tasks_per_s']:.4g} | "
                     f"{r['step_ms']:.1f} | {r['min_step_ms']:.1f} | {r['n']} | {r.get('peak_mem_mib', '-')} |")
    return "\n".join(L) + "\n"


def append(md: str, path: Path = RESULTS) -> None:
    """Add this run under the GPU section (created at the end of the file the first time); earlier runs stay."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start < 0:
        text = (text.rstrip("\n") + f"\n\n{SECTION}\n\nOne subsection per run of `benchmarks/gpu.sh` (the CUDA tests "
                "and conv4 meta-training throughput on the GPU), newest last. Measured, never asserted.\n\n" + md)
    else:
        m = re.search(r"^## ", text[start + len(SECTION):], flags=re.M)
        end = start + len(SECTION) + m.start() if m else len(text)
        text = text[:end].rstrip("\n") + "\n\n" + md + ("\n" + text[end:] if end < len(text) else "")
    path.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="no CUDA needed: run every CPU-side part (tests, benchmark "
                    "code on CPU with meta-batch 2), print the markdown, write nothing")
    ap.add_argument("--no-write", action="store_true", help="do not touch benchmarks/RESULTS.md")
    ap.add_argument("--no-tests", action="store_true", help="benchmarks only")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    info = machine(cuda)
    print(json.dumps({"machine": info}), flush=True)
    if not cuda:
        print(f"benchmarks/gpu.sh: no CUDA device (torch.cuda.is_available() is False; torch {torch.__version__}, "
              f"built for CUDA {torch.version.cuda}). The CUDA tests will report as skipped"
              + ("; the benchmark rows run on CPU with meta-batch 2 (dry run)." if args.dry_run else
                 "; nothing is benchmarked or written (--dry-run exercises the CPU-side parts)."), flush=True)
    tests = {"cmd": "(not run: --no-tests)", "passed": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [],
             "skip_reasons": [], "wall_s": 0, "exit_code": 0} if args.no_tests else run_tests()
    print(json.dumps({"tests": tests}), flush=True)
    if not cuda and not args.dry_run:
        return 2
    dry = args.dry_run or not cuda
    torch.set_num_threads(1 if dry else max(1, min(8, os.cpu_count() or 1)))
    rows = bench("cpu" if dry else "cuda", dry=dry)
    md = markdown(info, tests, rows, dry=dry)
    print(md)
    if not dry and not args.no_write:
        append(md)
        print(f"appended to {RESULTS.relative_to(ROOT)}")
    bad = tests.get("failures", 0) or tests.get("errors", 0) or "error" in tests or any("error" in r for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
