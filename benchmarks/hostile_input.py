"""Hostile input against the embedded default, measured (never asserted): ``metashrink serve`` on a fresh data
directory, then

1. the zip bomb of issue 12: 40 blank 4096x4096 PNGs (a few hundred KB zipped): status, seconds, and the growth
   of the serve process's resident memory (the API runs in it); then, for contrast, Omniglot's first minimal zip
   as a legitimate upload (202, then ready once the datasets worker has decoded it);
2. a 300 MB ``POST /v1/jobs`` body announced by Content-Length: status and seconds (refused before reading);
3. ``/healthz`` latency (p50/p95 of 200 calls) alone, and while four clients keep sending 6 MB adapt bodies
   (under the 8 MiB cap, so each is read and parsed; their 180,000 rows are then refused by the row cap);
4. four concurrent 250 MB dataset uploads (a regression CSV under the 256 MiB cap and the values cap, streamed by
   each client from disk): their status codes and the peak of the serve process's resident memory.

Writes the "Hostile input (embedded default)" section of benchmarks/RESULTS.md.

    python -m benchmarks.hostile_input
"""
from __future__ import annotations

import concurrent.futures as cf
import io
import os
import platform
import subprocess
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import psutil

from benchmarks.serve_harness import ROOT, Serve, write_section

# where datasets.omniglot looks (not imported: it would import torch here)
OMNIGLOT = Path(os.environ.get("METASHRINK_OMNIGLOT_DIR") or ROOT.parent / "shared" / "data" / "omniglot")


def bomb(n=40, side=4096) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.zeros((side, side), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(n):
            z.writestr(f"blank/c{i % 2}/{i}.png", png)
    return out.getvalue()


def healthz(s: Serve, n=200) -> np.ndarray:
    lat = []
    with httpx.Client(base_url=s.url, timeout=30) as c:
        for _ in range(n):
            t = time.perf_counter()
            c.get("/healthz")
            lat.append(1000 * (time.perf_counter() - t))
    return np.percentile(lat, [50, 95])


def big_csv(path: Path, mb=250) -> int:
    """A regression CSV of ``mb`` MB: 12 numbers a row (~13M values, under the 32M cap)."""
    line = ",".join(["3"] + ["0.12345678901234567"] * 11).encode() + b"\n"
    block = line * ((1 << 20) // len(line))
    with open(path, "wb") as f:
        f.write(b"task,x0,x1,x2,x3,x4,x5,x6,x7,x8,x9,y\n")
        for _ in range(mb):
            f.write(block)
    return path.stat().st_size


def uploads(s: Serve, api, tmp: Path, n=4) -> tuple:
    path = tmp / "big.csv"
    size = big_csv(path)
    rss0, peak, stop = api.memory_info().rss, [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], api.memory_info().rss)
            time.sleep(0.02)

    def send(i):
        with open(path, "rb") as f, httpx.Client(base_url=s.url, headers=s.client.headers, timeout=600) as c:
            r = c.post("/v1/datasets", files={"file": (f"big{i}.csv", f)}, data={"kind": "regression"})
        if r.status_code == 202:  # the datasets worker need not decode a gigabyte of CSV for this measurement
            c2 = httpx.Client(base_url=s.url, headers=s.client.headers, timeout=60)
            c2.delete(f"/v1/datasets/{r.json()['id']}")
        return r.status_code

    th = threading.Thread(target=watch)
    th.start()
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(n) as ex:
        codes = list(ex.map(send, range(n)))
    took = time.perf_counter() - t
    stop.set()
    th.join()
    path.unlink()
    return size, codes, took, rss0 / 2 ** 20, peak[0] / 2 ** 20


def main():
    tmp = Path(tempfile.mkdtemp(prefix="metashrink-hostile-"))
    s = Serve(tmp / "data", tmp / "serve.log")
    try:
        s.ready()
        api = psutil.Process(s.proc.pid)
        # 1. the bomb
        data = bomb()
        rss0, peak, stop = api.memory_info().rss, [0], threading.Event()

        def watch():
            while not stop.is_set():
                peak[0] = max(peak[0], api.memory_info().rss)
                time.sleep(0.02)

        th = threading.Thread(target=watch)
        th.start()
        t = time.perf_counter()
        r = s.client.post("/v1/datasets", files={"file": ("bomb.zip", data)}, data={"kind": "image_classes"},
                          timeout=300)
        bomb_s = time.perf_counter() - t
        stop.set()
        th.join()
        bomb_row = (len(data), r.status_code, bomb_s, (peak[0] - rss0) / 2 ** 20, r.json().get("detail", "")[:120])
        # 1b. a legitimate upload (Omniglot's first minimal zip): 202 from the API, decoded by the datasets worker
        omni = OMNIGLOT / "images_background_small1.zip"
        omni_row = None
        if omni.exists():
            data = omni.read_bytes()
            rss0, peak[0] = api.memory_info().rss, 0
            stop.clear()
            th = threading.Thread(target=watch)
            th.start()
            t = time.perf_counter()
            r = s.client.post("/v1/datasets", files={"file": (omni.name, data)}, data={"kind": "image_classes"},
                              timeout=300)
            accepted = time.perf_counter() - t
            d = r.json()
            while d.get("status") == "processing" and time.perf_counter() - t < 300:
                time.sleep(0.1)
                d = s.client.get(f"/v1/datasets/{d['id']}").json()
            stop.set()
            th.join()
            omni_row = (len(data), r.status_code, accepted, d.get("status"), time.perf_counter() - t,
                        (peak[0] - rss0) / 2 ** 20, d.get("images"))
        # 2. a 300 MB job body, announced
        def body():
            chunk = b" " * (1 << 20)
            for _ in range(300):
                yield chunk
        t = time.perf_counter()
        try:
            status = s.client.post("/v1/jobs", content=body(), headers={
                "Content-Type": "application/json", "Content-Length": str(300 << 20)}, timeout=120).status_code
        except httpx.TransportError as e:  # the server answered and closed while the client was still sending
            status = f"connection closed by the server ({type(e).__name__})"
        big_row = (status, time.perf_counter() - t)
        # 3. /healthz alone and under four 6 MB adapt bodies
        alone = healthz(s)
        model = s.run_job(steps=5)["model_id"]
        rows = [[0.123456789012345]] * 180_000  # about 6 MB of JSON, under the 8 MiB cap: read and parsed
        heavy = httpx.Request("POST", "/", json={"support": {"x": rows, "y": rows}, "query": {"x": [[0.0]]}}).content
        stop.clear()
        codes: list = []

        def sender(_):
            with httpx.Client(base_url=s.url, headers=s.client.headers, timeout=120) as c:
                while not stop.is_set():
                    codes.append(c.post(f"/v1/models/{model}/adapt", content=heavy,
                                        headers={"Content-Type": "application/json"}).status_code)

        with cf.ThreadPoolExecutor(4) as ex:
            futs = [ex.submit(sender, i) for i in range(4)]
            time.sleep(1.0)
            loaded = healthz(s)
            stop.set()
            for f in futs:
                f.result()
        # 4. four concurrent 250 MB uploads
        up_row = uploads(s, api, tmp)
    finally:
        s.stop()
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = ["## Hostile input (embedded default)", "",
             f"`python -m benchmarks.hostile_input` at {rev}, {time.strftime('%Y-%m-%d')}, {platform.machine()}, "
             f"{os.cpu_count()} cores; `metashrink serve` with its default caps. Measured, never asserted.", "",
             "| input | result |", "|---|---|",
             f"| zip bomb: 40 blank 4096x4096 PNGs, {bomb_row[0] / 1024:.0f} KB zipped | {bomb_row[1]} after "
             f"{bomb_row[2]:.2f} s; serve's resident memory peaked {bomb_row[3]:.0f} MB above its start "
             f"(`{bomb_row[4]}`) |",
             *([f"| Omniglot's images_background_small1.zip, {omni_row[0] / 2 ** 20:.1f} MB ({omni_row[6]} images) | "
                f"{omni_row[1]} after {omni_row[2]:.2f} s, {omni_row[3]} after {omni_row[4]:.1f} s (decoded by the "
                f"datasets worker); serve's resident memory peaked {omni_row[5]:.0f} MB above its start |"]
               if omni_row else []),
             f"| `POST /v1/jobs` announcing 300 MB | {big_row[0]} after {big_row[1]:.2f} s |",
             f"| `/healthz` p50/p95, idle | {alone[0]:.1f} / {alone[1]:.1f} ms |",
             f"| `/healthz` p50/p95 while 4 clients send 6 MB adapt bodies | {loaded[0]:.1f} / {loaded[1]:.1f} ms "
             f"(their codes: { {c: codes.count(c) for c in sorted(set(codes))} }) |",
             f"| 4 concurrent uploads of a {up_row[0] / 2 ** 20:.0f} MB regression CSV | codes {up_row[1]} after "
             f"{up_row[2]:.1f} s; serve's resident memory {up_row[3]:.0f} MB before, peak {up_row[4]:.0f} MB |"]
    print(write_section(lines))


if __name__ == "__main__":
    main()
