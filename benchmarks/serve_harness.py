"""``metashrink serve`` driven as a user would, as real processes: start it on a data directory, read the key
it prints, wait for readiness, find its children, submit jobs. Used by tests/service/test_serve.py and by
benchmarks/chaos.py."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from benchmarks import machine

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_config(steps: int) -> dict:
    """A small sinusoid sigma-Reptile job (as tests/service/conftest.py's small_config)."""
    return {"algorithm": {"name": "sigma_reptile"}, "model": {"arch": "mlp", "hidden": [40, 40]},
            "modules": {"partition": "per_tensor"}, "tasks": {"family": "sinusoid", "shots": 10, "query": 10},
            "inner": {"optimizer": "proximal_gd", "lr": 0.01, "steps": 5},
            "outer": {"meta_batch": 10, "steps": steps, "lr_phi": 0.003, "lr_log_sigma2": 0.01},
            # compile: false: the tests' long jobs (100,000 steps, to be cancelled or killed) would otherwise compile
            # at their fifth step (execution.compile "auto"), and a compiling step delays a cancel by its minute
            "execution": {"vectorize": "vmap", "device": "cpu", "compile": False},
            "run": {"checkpoint_every": 10, "module_map_every": 10, "log_every": 5}, "seed": 0}


class Serve:
    def __init__(self, data: Path, log: Path, args: tuple = ()):
        """``args``: more ``metashrink serve`` arguments (e.g. ``("--adapt-workers", "2")``)."""
        self.data, self.port = data, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("METASHRINK_")}
        self.log = open(log, "ab")
        self.logpath = log
        # stdout and stderr to the log file: a pipe nobody drains would fill with access-log lines and stall
        # the server
        self.proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--data-dir", str(data),
                                      "--port", str(self.port), *args], cwd=ROOT, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.key, t0 = None, time.monotonic()
        while self.key is None and self.proc.poll() is None and time.monotonic() - t0 < 120:
            lines = log.read_text(errors="replace").splitlines()
            for i, line in enumerate(lines[:-1]):  # the key is the line after "API key for tenant"
                if line.startswith("API key for tenant"):
                    self.key = lines[i + 1].strip()
            time.sleep(0.1)
        assert self.key, f"serve did not print a key; see {log}"
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=30)

    def ready(self, timeout=120) -> dict:
        t0 = time.monotonic()
        while True:
            try:
                r = self.client.get("/readyz")
                if r.status_code == 200:
                    return r.json()
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < timeout, f"not ready after {timeout} s; see {self.logpath}"
            time.sleep(0.5)

    def children(self) -> dict:
        """name -> psutil.Process of every descendant, keyed as the supervisor names them."""
        out = {}
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except psutil.Error:  # gone, or a zombie the supervisor has not reaped yet
                continue
            if "redis-server" in cmd:
                out.setdefault("redis", []).append(p)
            elif "-Q train" in cmd:
                out.setdefault("train", []).append(p)
            elif "-Q adapt_heavy" in cmd:
                out.setdefault("adapt_heavy", []).append(p)
            elif "-Q adapt" in cmd:
                out.setdefault("adapt", []).append(p)
        return out

    def submit(self, steps=20) -> str:
        r = self.client.post("/v1/jobs", json=job_config(steps))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def run_job(self, steps=20, timeout=300) -> dict:
        return self.wait(self.submit(steps), timeout=timeout)

    def wait(self, jid, timeout=300, pred=None, client=None) -> dict:
        t0 = time.monotonic()
        while True:
            try:
                j = (client or self.client).get(f"/v1/jobs/{jid}").json()
            except httpx.TransportError:  # a restart in progress
                j = {"status": "unreachable"}
            if pred(j) if pred else j["status"] in ("succeeded", "failed", "canceled"):
                return j
            assert time.monotonic() - t0 < timeout, f"job stuck: {j}; see {self.logpath}"
            time.sleep(0.5)

    def stop(self) -> None:
        """Teardown, also after a failed assertion: SIGTERM, then SIGKILL whatever is left of the tree."""
        if self.proc.poll() is not None:
            return
        kids = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.terminate()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for p in all_gone(kids):
            p.kill()

    def log_text(self) -> str:
        self.log.flush()
        return self.logpath.read_text(errors="replace")


def all_gone(procs, timeout=20) -> list:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def write_section(lines: list[str]) -> str:
    """Replace (or append) the ``## ...`` section of benchmarks/RESULTS.md whose heading is ``lines[0]``."""
    section = "\n".join(lines) + "\n"
    machine.write_section(section)
    return section
