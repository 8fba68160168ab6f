"""docker-compose.yml's own services, run as local processes (no Docker engine): an adapt request is answered while
a long training job runs, because training and adaptation have workers of their own (issue 13, item 2).

Each app service's ``command``, ``environment`` and ``healthcheck`` are taken from the YAML as compose would
interpolate them (``${VAR:-default}``, ``$$``); only what names a host or a container path is replaced:

- the database URL -> a fresh database on the local PostgreSQL (as tests/service/conftest.py does);
- the broker URL -> the local Redis on a spare DB number;
- /data (the ``artifacts`` volume; Dockerfile ``METASHRINK_DATA_DIR``) -> a tmp dir, an s3:// artifact store ->
  a directory under it (its endpoint and credentials dropped), /app (Dockerfile ``WORKDIR``, ``PYTHONPATH``) ->
  this checkout;
- a published port -> a free local one (``--host 0.0.0.0`` -> 127.0.0.1); ``celery``, ``uvicorn``, ``alembic``,
  ``python`` -> the ones of this venv.

Any other value that still names a compose service's host fails the test, so a new dependency in the file
cannot be silently skipped here. Services under a profile (``cpu``, ``gpu-adapt``) are alternatives to default
ones and are only validated by ``docker-compose config``.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from benchmarks.serve_harness import job_config

from .conftest import PG_ADMIN, REDIS_HOST, REDIS_PORT, _reachable, redis_db

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent
# what the image sets (Dockerfile): WORKDIR /app, PYTHONPATH=/app, METASHRINK_DATA_DIR=/data
IMAGE_ENV = {"PYTHONPATH": "/app", "METASHRINK_DATA_DIR": "/data"}
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict):
    """Compose's variable substitution: ``$$`` -> ``$``, ``${V}``, ``$V``, ``${V:-d}`` (d when V is unset or
    empty), ``${V-d}`` (d when V is unset)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, default = m.group(2), m.group(3) or ""
        v = env.get(name)
        if op == ":-":
            return v if v else default
        if op == "-":
            return default if v is None else v
        if op in (":?", "?"):
            assert v, f"compose requires {name}: {default}"
        return v or ""
    return _VAR.sub(sub, value)


def load_compose() -> dict:
    import yaml  # PyYAML (dev extra)

    doc = yaml.safe_load(COMPOSE.read_text())  # safe_load resolves the anchors and << merge keys
    return interpolate(doc, {k: v for k, v in os.environ.items() if not k.startswith("METASHRINK_")})


def app_services(doc: dict) -> dict:
    """The services built from this repository's image, in the default profile."""
    return {n: s for n, s in doc["services"].items()
            if str(s.get("image", "")).startswith("metashrink") and not s.get("profiles")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_path(v: str, tmp: Path) -> str:
    if v == "/data" or v.startswith("/data/"):
        return str(tmp) + v[len("/data"):]
    if v == "/app" or v.startswith("/app/"):
        return str(ROOT) + v[len("/app"):]
    return v


class Local:
    """The hosts of the compose file mapped to local ones."""

    def __init__(self, doc, tmp: Path, db_url: str, broker: str):
        self.doc, self.tmp, self.db_url, self.broker = doc, tmp, db_url, broker
        self.hosts = set(doc["services"])
        self.ports = {}  # container port -> local port

    def port(self, container_port: str) -> str:
        if container_port not in self.ports:
            self.ports[container_port] = str(free_port())
        return self.ports[container_port]

    def env(self, service: dict) -> dict:
        e = {k: v for k, v in os.environ.items() if not k.startswith(("METASHRINK_", "AWS_"))}
        compose_env = {**IMAGE_ENV, **{k: str(v) for k, v in (service.get("environment") or {}).items()}}
        for k, v in compose_env.items():
            v = local_path(v, self.tmp)
            if k == "METASHRINK_DATABASE_URL":
                v = self.db_url
            elif k == "METASHRINK_BROKER_URL":
                v = self.broker
            elif k == "METASHRINK_ARTIFACTS_URL" and v.startswith("s3://"):
                v = str(self.tmp / "artifacts")
            elif k.startswith(("METASHRINK_S3_", "AWS_")) and compose_env.get("METASHRINK_ARTIFACTS_URL",
                                                                               "").startswith("s3://"):
                continue  # the object store is replaced by a local directory
            named = [h for h in self.hosts if re.search(rf"(^|[/@]){re.escape(h)}(:\d+|/|$)", v)]
            assert not named, f"{k}={v!r} names the compose host(s) {named}: map them in this test"
            e[k] = v
        e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
        e["HOSTNAME"] = socket.gethostname()  # as in a container; the healthchecks read it (celery's %h)
        return e

    def command(self, argv: list) -> list:
        argv = [local_path(str(a), self.tmp) for a in argv]
        if (BIN / argv[0]).exists():
            argv[0] = str(BIN / argv[0])
        for i, a in enumerate(argv[:-1]):
            if a == "--port":
                argv[i + 1] = self.port(argv[i + 1])
            elif a == "--host":
                argv[i + 1] = "127.0.0.1"
        return argv

    def healthcheck(self, test: list) -> list:
        kind, rest = test[0], test[1:]
        if kind == "CMD-SHELL":
            cmd = rest[0]
        else:
            assert kind == "CMD", test
            cmd = " ".join(shlex.quote(a) for a in rest)
        for container, local in self.ports.items():
            cmd = cmd.replace(f"127.0.0.1:{container}/", f"127.0.0.1:{local}/")
        return ["sh", "-c", cmd]


def start(argv, env, log: Path) -> subprocess.Popen:
    out = open(log, "ab")
    try:
        return subprocess.Popen(argv, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    finally:
        out.close()


def stop(p: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        try:
            p.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_compose_file_validates_and_separates_train_from_adapt():
    doc = load_compose()
    queues = {}
    for name, svc in doc["services"].items():
        cmd = svc.get("command") or []
        if "-Q" in cmd:
            queues[name] = set(cmd[cmd.index("-Q") + 1].split(","))
    # no worker consumes both train and adapt; each queue has a default-profile consumer
    assert not [n for n, q in queues.items() if {"train", "adapt"} <= q], queues
    default = {n for n in queues if not doc["services"][n].get("profiles")}
    from worker.celery_app import QUEUES
    for q in QUEUES:
        assert [n for n in default if q in queues[n]], f"no default service consumes {q}"
    assert queues["worker-adapt"] == {"adapt"} and queues["worker-adapt-gpu"] == {"adapt"}
    assert queues["worker-adapt-heavy"] == {"adapt_heavy"}
    assert doc["services"]["worker-adapt-gpu"]["environment"]["METASHRINK_ADAPT_DEVICE"] == "cuda"
    # concurrency from the environment, as compose interpolates it
    raw = COMPOSE.read_text()
    assert "${METASHRINK_ADAPT_CONCURRENCY:-2}" in raw and "${METASHRINK_TRAIN_CONCURRENCY:-1}" in raw
    cmd = interpolate(["-c", "${METASHRINK_ADAPT_CONCURRENCY:-2}"], {"METASHRINK_ADAPT_CONCURRENCY": "6"})
    assert cmd == ["-c", "6"]
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose binary not installed (.ci/run installs Debian's package)")
    import yaml
    for profiles in ([], ["cpu", "gpu-adapt"]):
        args = [a for p in profiles for a in ("--profile", p)]
        r = subprocess.run([exe, "-f", str(COMPOSE), *args, "config"], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "METASHRINK_ADAPT_CONCURRENCY": "3", "METASHRINK_TRAIN_GPUS": "4"})
        assert r.returncode == 0, r.stderr
        resolved = yaml.safe_load(r.stdout)["services"]
        cmd = resolved["worker-adapt"]["command"]
        assert cmd[cmd.index("-c") + 1] == "3"  # the variable reached the adapt worker's concurrency
        cmd = resolved["worker"]["command"]
        assert cmd[cmd.index("-Q") + 1] == "train" and cmd[cmd.index("-c") + 1] == "1"
        gpus = resolved["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["count"]
        assert str(gpus) == "4"  # GPUs of the training worker, for execution.world_size


@pytest.fixture
def compose(tmp_path):
    if not (_reachable("127.0.0.1", 5432) and _reachable(REDIS_HOST, REDIS_PORT)):
        pytest.skip("PostgreSQL or Redis is not running on 127.0.0.1 (.ci/run starts them)")
    import psycopg

    name = f"ms_compose_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    data = tmp_path / "data"
    data.mkdir()
    procs = {}
    try:
        with redis_db() as dbn:
            local = Local(load_compose(), data, f"postgresql://postgres@127.0.0.1:5432/{name}",
                          f"redis://{REDIS_HOST}:{REDIS_PORT}/{dbn}")
            try:
                yield local, procs, tmp_path
            finally:
                for p in reversed(list(procs.values())):
                    stop(p)
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_adapt_is_answered_while_a_long_job_trains(compose):
    import httpx

    local, procs, tmp = compose
    services = app_services(local.doc)
    assert {"migrate", "api", "worker", "worker-adapt", "worker-adapt-heavy", "worker-datasets"} <= set(services), \
        sorted(services)

    # the one-shot migration first (compose: the others depend on service_completed_successfully)
    mig = services.pop("migrate")
    r = subprocess.run(local.command(mig["command"]), env=local.env(mig), cwd=ROOT, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr

    for name, svc in services.items():
        procs[name] = start(local.command(svc["command"]), local.env(svc), tmp / f"{name}.log")
    api = services["api"]
    container_port = next(p.split(":")[-1] for p in api["ports"])
    base = f"http://127.0.0.1:{local.ports[container_port]}"
    # a key, as the README says: docker-compose exec api metashrink keys create --tenant NAME
    out = subprocess.run([str(BIN / "metashrink"), "keys", "create", "--tenant", "compose"], env=local.env(api),
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip().splitlines()[-1]

    def logs():
        return "; logs: " + ", ".join(str(tmp / f"{n}.log") for n in procs)

    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        t0 = time.monotonic()
        while True:
            for n, p in procs.items():
                assert p.poll() is None, f"{n} exited with {p.returncode}{logs()}"
            try:
                ready = c.get("/readyz")
                if ready.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() - t0 < 240, f"never ready{logs()}"
            time.sleep(1)
        workers = ready.json()["workers"]
        # the compose workers, each on its own queue
        assert all(w.startswith("worker@") for w in workers["train"]), workers
        assert all(w.startswith("worker-adapt@") for w in workers["adapt"]), workers
        assert not set(workers["train"]) & set(workers["adapt"]), workers

        def job(jid):
            r = c.get(f"/v1/jobs/{jid}")
            assert r.status_code == 200, r.text
            return r.json()

        def wait(jid, pred, timeout):
            t0 = time.monotonic()
            while True:
                j = job(jid)
                if pred(j):
                    return j
                assert j["status"] not in ("failed", "canceled"), j
                assert time.monotonic() - t0 < timeout, f"{j}{logs()}"
                time.sleep(0.5)

        # a model to adapt
        r = c.post("/v1/jobs", json=job_config(20))
        assert r.status_code == 202, r.text
        small = wait(r.json()["id"], lambda j: j["status"] == "succeeded", 300)
        # a long training job, running on the train worker
        long_cfg = job_config(1_000_000)
        long_cfg["run"] = {"checkpoint_every": 1000, "module_map_every": 1000, "log_every": 50}
        r = c.post("/v1/jobs", json=long_cfg)
        assert r.status_code == 202, r.text
        long_id = r.json()["id"]
        before = wait(long_id, lambda j: j["status"] == "running" and j["progress"]["step"] > 0, 120)

        body = {"support": {"x": [[-2.0], [0.0], [1.5]], "y": [[-1.8], [0.1], [1.9]]},
                "query": {"x": [[0.5], [1.0]]}, "steps": 50}
        t_adapt = time.monotonic()
        r = c.post(f"/v1/models/{small['model_id']}/adapt", json=body)
        latency = time.monotonic() - t_adapt
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 2 and len(r.json()["loss_curve"]) == 51
        during = job(long_id)
        assert during["status"] == "running" and during["progress"]["step"] >= before["progress"]["step"], during
        assert during["progress"]["step"] < during["progress"]["total"]
        print(f"adapt answered in {latency:.2f} s while job {long_id} ran (step {before['progress']['step']} -> "
              f"{during['progress']['step']} of {during['progress']['total']})")

        # the services' own healthchecks pass against the local processes
        for name, svc in local.doc["services"].items():
            if name in procs and svc.get("healthcheck"):
                hc = local.healthcheck(svc["healthcheck"]["test"])
                h = subprocess.run(hc, env=local.env(svc), cwd=ROOT, capture_output=True, text=True, timeout=90)
                assert h.returncode == 0, f"{name} healthcheck {hc}: {h.stdout}{h.stderr}"

        r = c.post(f"/v1/jobs/{long_id}/cancel")
        assert r.status_code == 202, r.text
        wait(long_id, lambda j: j["status"] == "canceled", 120)
