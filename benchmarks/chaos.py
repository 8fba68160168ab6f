"""Faults against the embedded default, measured (never asserted): ``metashrink serve`` on a fresh data directory,
then, as real processes,

1. SIGKILL of each child (train worker, adapt worker, redis-server): seconds until ``/readyz`` is 200 again
   and an adapt answers 200;
2. redis-server SIGKILLed mid-job: adapt status codes during the outage, seconds until adapt answers 200 again,
   seconds until the job makes progress again, and whether it finishes once with contiguous metrics;
3. the train worker SIGKILLed ``--kills`` times at seeded random steps of one job (each once the job has resumed
   past the previous kill): whether it succeeds and its published tensors equal an uninterrupted run's, bit for
   bit;
4. one tenant flooding adapt (10 concurrent clients of 2,000 steps on 500 rows, for ``--flood-seconds``) while
   another sends small adapts one after another: the small tenant's p50/p95 latency and status codes, beside
   the same small requests without the flood.

Writes the "Chaos (embedded default)" section of benchmarks/RESULTS.md.

    python -m benchmarks.chaos [--kills 5] [--flood-seconds 30]
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from benchmarks.serve_harness import ROOT, Serve, job_config, write_section

SMALL = {"support": {"x": [[0.0], [1.0], [2.0]], "y": [[0.0], [0.8], [0.9]]}, "query": {"x": [[0.5]]}, "steps": 5}


def adapt_ok(s: Serve, model: str, client=None) -> int:
    try:
        return (client or s.client).post(f"/v1/models/{model}/adapt", json=SMALL).status_code
    except httpx.TransportError:
        return 0


def repair_times(s: Serve, model: str) -> dict:
    out = {}
    for child in ("train", "adapt", "redis"):
        pid = s.children()[child][0].pid
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
        while True:
            r = s.client.get("/readyz")
            if r.status_code == 200 and adapt_ok(s, model) == 200 and child in s.children() and \
                    s.children()[child][0].pid != pid:
                break
            time.sleep(0.1)
        out[child] = time.monotonic() - t0
        time.sleep(65)  # past the supervisor's back-off reset (a minute of uptime)
    return out


def redis_mid_job(s: Serve, model: str) -> dict:
    jid = s.submit(steps=400)
    j = s.wait(jid, pred=lambda j: j["status"] == "running" and j["progress"]["step"] >= 20)
    at = j["progress"]["step"]
    t0 = time.monotonic()
    os.kill(s.children()["redis"][0].pid, signal.SIGKILL)
    codes = []
    while True:
        codes.append(adapt_ok(s, model))
        if codes[-1] == 200:
            break
        time.sleep(0.05)
    adapt_back = time.monotonic() - t0
    s.wait(jid, pred=lambda j: j["status"] != "running" or j["progress"]["step"] > at + 5)
    progress_back = time.monotonic() - t0
    j = s.wait(jid, timeout=600)
    steps = [st for st, _ in s.client.get(f"/v1/jobs/{jid}/metrics").json()["series"]["query_loss"]]
    return {"codes": {c: codes.count(c) for c in sorted(set(codes))}, "adapt_back": adapt_back,
            "progress_back": progress_back, "status": j["status"], "contiguous": steps == list(range(1, 401))}


def model_tensors(s: Serve, model_id: str) -> dict:
    """The published tensors (the file's sha256 differs between jobs: its header names the job)."""
    from safetensors.torch import load
    return load(s.client.get(f"/v1/models/{model_id}/file").content)


def same_tensors(a: dict, b: dict) -> bool:
    import torch
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def repeated_kills(s: Serve, kills: int) -> dict:
    ref = s.run_job(steps=400, timeout=900)
    rng = random.Random(0)
    points = sorted(rng.sample(range(5, 395), kills))
    jid = s.submit(steps=400)
    t0, survived, last = time.monotonic(), 0, -1
    for at in points:  # each kill once the job has resumed past the previous one (a live worker is training it)
        at = max(at, last + 1)
        j = s.wait(jid, timeout=900, pred=lambda j, at=at: j["status"] in ("succeeded", "failed", "canceled") or (
            j["status"] == "running" and j["progress"]["step"] >= at and "train" in s.children()))
        if j["status"] != "running":
            break
        os.kill(s.children()["train"][0].pid, signal.SIGKILL)
        survived, last = survived + 1, j["progress"]["step"]
    j = s.wait(jid, timeout=1800)
    return {"kills": survived, "status": j["status"], "attempts": j["attempts"], "seconds": time.monotonic() - t0,
            "identical": j["status"] == "succeeded" and same_tensors(model_tensors(s, j["model_id"]),
                                                                      model_tensors(s, ref["model_id"]))}


def flood(s: Serve, seconds: float) -> dict:
    key = subprocess.run([sys.executable, "-m", "client.cli", "keys", "create", "--tenant", "other",
                          "--data-dir", str(s.data)], cwd=ROOT, capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if not k.startswith("METASHRINK_")},
                         check=True).stdout.strip().splitlines()[-1]
    other = httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {key}"}, timeout=300)
    r = other.post("/v1/jobs", json=job_config(5))
    mine = s.wait(r.json()["id"], client=other)["model_id"]

    def small(n):
        lat, codes = [], []
        for _ in range(n):
            t = time.perf_counter()
            codes.append(other.post(f"/v1/models/{mine}/adapt", json=SMALL).status_code)
            lat.append(1000 * (time.perf_counter() - t))
        return lat, codes

    base_lat, _ = small(30)
    rows = [[float(i % 50) / 10] for i in range(500)]
    heavy = {"support": {"x": rows, "y": rows}, "query": {"x": [[0.5]]}, "steps": 2000, "modules": "all"}
    model = s.run_job(steps=5)["model_id"]
    stop = time.monotonic() + seconds
    flood_codes: list = []

    def flooder(_):
        with httpx.Client(base_url=s.url, headers=s.client.headers, timeout=300) as c:
            while time.monotonic() < stop:
                flood_codes.append(c.post(f"/v1/models/{model}/adapt", json=heavy).status_code)
                if flood_codes[-1] == 429:
                    time.sleep(0.2)

    with cf.ThreadPoolExecutor(10) as ex:
        futs = [ex.submit(flooder, i) for i in range(10)]
        time.sleep(1.0)
        lat, codes = [], []
        while time.monotonic() < stop:
            a, b = small(1)
            lat += a
            codes += b
        for f in futs:
            f.result()
    return {"base": np.percentile(base_lat, [50, 95]), "during": np.percentile(lat, [50, 95]), "n": len(lat),
            "codes": {c: codes.count(c) for c in sorted(set(codes))},
            "flood_codes": {c: flood_codes.count(c) for c in sorted(set(flood_codes))}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=5)
    p.add_argument("--flood-seconds", type=float, default=30.0)
    a = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="metashrink-chaos-"))
    s = Serve(tmp / "data", tmp / "serve.log")
    try:
        s.ready()
        model = s.run_job(steps=5)["model_id"]
        rep = repair_times(s, model)
        red = redis_mid_job(s, model)
        kil = repeated_kills(s, a.kills)
        fl = flood(s, a.flood_seconds)
    finally:
        s.stop()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = ["## Chaos (embedded default)", "",
             f"`python -m benchmarks.chaos --kills {a.kills} --flood-seconds {a.flood_seconds:g}` at {rev}, "
             f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores; `metashrink serve` on a "
             "fresh data directory, faults as real processes (SIGKILL). Measured, never asserted; the assertions "
             "live in tests/service/test_serve.py and test_service.py.", "",
             "| fault | result |", "|---|---|"]
    for child, sec in rep.items():
        lines.append(f"| SIGKILL {child} ({'redis-server' if child == 'redis' else child + ' worker'}) | "
                     f"/readyz 200 and an adapt 200 again after {sec:.1f} s |")
    lines.append(f"| SIGKILL redis-server mid-job | adapt answers {red['codes']} during the outage, 200 after "
                 f"{red['adapt_back']:.1f} s; the job progresses again after {red['progress_back']:.1f} s and ends "
                 f"{red['status']} once, metrics contiguous: {red['contiguous']} |")
    lines.append(f"| SIGKILL the train worker at {kil['kills']} seeded random steps of one 400-step job | "
                 f"{kil['status']} (attempts {kil['attempts']}) in {kil['seconds']:.0f} s; every published tensor "
                 f"bit-identical to an uninterrupted run's: {kil['identical']} |")
    lines.append(f"| one tenant floods adapt (10 clients, 2,000 steps x 500 rows, {a.flood_seconds:g} s) | another "
                 f"tenant's small adapts: p50/p95 {fl['during'][0]:.0f}/{fl['during'][1]:.0f} ms over {fl['n']} "
                 f"requests, codes {fl['codes']} (without the flood {fl['base'][0]:.0f}/{fl['base'][1]:.0f} ms); "
                 f"the flood's codes {fl['flood_codes']} |")
    print(write_section(lines))


if __name__ == "__main__":
    main()
