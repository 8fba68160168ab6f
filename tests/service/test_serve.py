"""``metashrink serve`` as a user runs it, as real processes: one owner per data directory, children that die
with it, dead workers and a dead broker restarted, broker loss recovered without a restart."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from .conftest import small_config

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    def __init__(self, data: Path, log: Path):
        self.data, self.port = data, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("METASHRINK_")}
        self.log = open(log, "ab")
        self.logpath = log
        self.proc = subprocess.Popen([sys.executable, "-m", "client.cli", "serve", "--data-dir", str(data),
                                      "--port", str(self.port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        self.key = None
        for line in self.proc.stdout:  # the key is the line after "API key for tenant"
            if self.key == "":
                self.key = line.strip()
                break
            if line.startswith("API key for tenant"):
                self.key = ""
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
            cmd = " ".join(p.cmdline())
            if "redis-server" in cmd:
                out.setdefault("redis", []).append(p)
            elif "-Q train" in cmd:
                out.setdefault("train", []).append(p)
            elif "-Q adapt" in cmd:
                out.setdefault("adapt", []).append(p)
        return out

    def submit(self, steps=20) -> str:
        r = self.client.post("/v1/jobs", json=small_config(steps=steps))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def run_job(self, steps=20, timeout=300) -> dict:
        return self.wait(self.submit(steps), timeout=timeout)

    def wait(self, jid, timeout=300, pred=None) -> dict:
        t0 = time.monotonic()
        while True:
            try:
                j = self.client.get(f"/v1/jobs/{jid}").json()
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
        for p in _all_gone(kids):
            p.kill()

    def log_text(self) -> str:
        self.log.flush()
        return self.logpath.read_text(errors="replace")


def _all_gone(procs, timeout=20) -> list:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    s = Serve(tmp / "data", tmp / "serve.log")
    s.ready()
    yield s
    s.stop()


def test_ready_reports_workers(serve):
    r = serve.ready()
    assert r["checks"] == {"database": "ok", "broker": "ok", "workers": "ok"}, r
    assert r["workers"]["train"] and r["workers"]["adapt"], r


def test_a_second_serve_on_the_same_data_dir_is_refused(serve, tmp_path):
    before = {n: [p.pid for p in ps] for n, ps in serve.children().items()}
    p = subprocess.run([sys.executable, "-m", "client.cli", "serve", "--data-dir", str(serve.data),
                        "--port", str(_free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "already served" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert {n: [q.pid for q in ps] for n, ps in serve.children().items()} == before  # nothing touched
    serve.ready(timeout=5)
    # a data directory that cannot be created: a message, no traceback, nothing left running
    bad = tmp_path / "file"
    bad.write_text("")
    p = subprocess.run([sys.executable, "-m", "client.cli", "serve", "--data-dir", str(bad / "data"),
                        "--port", str(_free_port())], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0 and "cannot use the data directory" in p.stderr and "Traceback" not in p.stderr


def test_cli_against_a_running_and_a_missing_server(serve):
    cli = [sys.executable, "-m", "client.cli", "jobs", "list", "--key", serve.key]
    p = subprocess.run(cli + ["--url", serve.url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "items" in p.stdout, p.stderr
    p = subprocess.run(cli + ["--url", f"http://127.0.0.1:{_free_port()}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 3 and "cannot reach the Metashrink API" in p.stderr and "Traceback" not in p.stderr


def test_dead_worker_and_dead_broker_are_restarted(serve):
    train = serve.children()["train"]
    os.kill(train[0].pid, signal.SIGKILL)  # the worker's main process; its pool child follows it
    assert not _all_gone(train), "the prefork child outlived its worker"
    serve.ready(timeout=60)
    assert serve.run_job()["status"] == "succeeded"
    assert "train worker" in serve.log_text() and "restarting" in serve.log_text()
    # the broker, mid-job: adapt answers 503 while it is down, then everything recovers by itself; the job
    # finishes once, its metrics contiguous
    model = serve.run_job(steps=5)["model_id"]
    jid = serve.submit(steps=400)
    serve.wait(jid, pred=lambda j: j["status"] == "running" and j["progress"]["step"] >= 20)
    os.kill(serve.children()["redis"][0].pid, signal.SIGKILL)
    body = {"support": {"x": [[0.0], [1.0]], "y": [[0.0], [0.8]]}, "query": {"x": [[0.5]]}, "steps": 5}
    codes, t0 = [], time.monotonic()
    while time.monotonic() - t0 < 60:
        codes.append(serve.client.post(f"/v1/models/{model}/adapt", json=body).status_code)
        if codes[-1] == 200 and 503 in codes:
            break
    assert 503 in codes and codes[-1] == 200 and set(codes) <= {200, 503}, codes
    j = serve.wait(jid)
    assert j["status"] == "succeeded", j
    series = serve.client.get(f"/v1/jobs/{jid}/metrics").json()["series"]["query_loss"]
    assert [s for s, _ in series] == list(range(1, 401))
    serve.ready(timeout=60)
    # the supervisor and the workers report through serve's multiprocess metrics directory
    text = serve.client.get("/metrics").text
    samples = dict(ln.rsplit(" ", 1) for ln in text.splitlines() if ln and not ln.startswith("#"))
    assert float(samples['metashrink_supervisor_restarts_total{child="train worker"}']) >= 1
    assert float(samples['metashrink_supervisor_restarts_total{child="redis-server"}']) >= 1
    assert float(samples['metashrink_meta_steps_total{algorithm="sigma_reptile"}']) >= 40


def test_sigkilled_serve_leaves_no_orphans_and_releases_its_data_dir(serve, tmp_path):
    jid = serve.submit(steps=300)
    serve.wait(jid, pred=lambda j: j["status"] == "running" and j["progress"]["step"] >= 20)
    kids = [p for ps in serve.children().values() for p in ps]
    assert {"redis", "train", "adapt"} <= set(serve.children())
    serve.proc.kill()
    serve.proc.wait(timeout=10)
    alive = _all_gone(kids)
    for p in alive:
        p.kill()
    assert not alive, "children outlived a SIGKILLed serve"
    again = Serve(serve.data, tmp_path / "serve2.log")  # the lock went with the dead process
    try:
        again.ready()
        j = again.wait(jid)  # the job killed with serve resumes and finishes once
        assert j["status"] == "succeeded", j
        series = again.client.get(f"/v1/jobs/{jid}/metrics").json()["series"]["query_loss"]
        assert [s for s, _ in series] == list(range(1, 301))
        kids = [p for ps in again.children().values() for p in ps]
        again.proc.send_signal(signal.SIGTERM)
        assert again.proc.wait(timeout=60) == 0
        assert not _all_gone(kids), "a clean shutdown left children running"
    finally:
        again.stop()
