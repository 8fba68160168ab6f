"""GET /v1/jobs/{id}/events (Server-Sent Events, streamed over a real socket) and GET /dashboard."""
from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

from .conftest import small_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url(service):
    """The service's app behind a real uvicorn server (streaming for real, not buffered by a test client)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(service.app, host="127.0.0.1", port=port, lifespan="off",
                                           log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    t0 = time.monotonic()
    while not server.started:
        assert time.monotonic() - t0 < 20, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    th.join(timeout=10)


def read_events(resp):
    """Parse an SSE stream into [(event, data, arrival time)]."""
    out, ev, data = [], None, []
    for line in resp.iter_lines():
        if line == "":
            if ev is not None:
                out.append((ev, json.loads("\n".join(data)), time.monotonic()))
            ev, data = None, []
        elif line.startswith("event: "):
            ev = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
    return out


def test_events_stream_to_terminal_status(service, base_url):
    jid = service.submit(small_config(steps=80, seed=7))
    t0 = time.monotonic()
    with httpx.Client(base_url=base_url, timeout=httpx.Timeout(10, read=60)) as c:
        with c.stream("GET", f"/v1/jobs/{jid}/events", headers=service.h()) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = read_events(r)
    kinds = [e for e, _, _ in events]
    assert kinds[:3] == ["progress", "metrics", "status"]  # the first poll sends everything
    assert events[-1][0] == "status" and events[-1][1]["status"] == "succeeded" and events[-1][1]["model_id"]
    steps = [d["step"] for e, d, _ in events if e == "progress"]
    assert steps == sorted(steps) and steps[-1] == 80 and len(set(steps)) == len(steps)  # one event per change
    assert len(steps) >= 3, steps  # progress arrived while the job ran, not only at the end
    assert any(0 < s < 80 for s in steps)
    assert all(d["total"] == 80 for e, d, _ in events if e == "progress")
    statuses = [d["status"] for e, d, _ in events if e == "status"]
    assert statuses[-1] == "succeeded" and len(statuses) == len(set(statuses))
    assert any("query_loss" in d["metrics"] for e, d, _ in events if e == "metrics")
    # streamed: the first event came well before the last one
    assert events[-1][2] - events[0][2] > 0.3 and events[0][2] - t0 < 5


def test_events_auth_and_tenant(service, base_url, reference):
    jid, _ = reference
    with httpx.Client(base_url=base_url, timeout=30) as c:
        assert c.get(f"/v1/jobs/{jid}/events").status_code == 401
        assert c.get(f"/v1/jobs/{jid}/events", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get(f"/v1/jobs/{jid}/events", headers=service.h("bob")).status_code == 404
        assert c.get("/v1/jobs/job_missing/events", headers=service.h()).status_code == 404
        # a finished job: the current state, then the stream ends by itself
        with c.stream("GET", f"/v1/jobs/{jid}/events", headers=service.h()) as r:
            events = read_events(r)
    assert [e for e, _, _ in events] == ["progress", "metrics", "status"]
    assert events[-1][1]["status"] == "succeeded"


def test_dashboard_served_self_contained(service):
    r = service.client.get("/dashboard")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    for endpoint in ("/v1/jobs", "/metrics", "/modules", "/events"):
        assert endpoint in html
    assert "Authorization" in html and "Bearer" in html
    assert "Math.log10" in html and "createElementNS" in html  # log-scale bars drawn as inline SVG
    # no external assets: no src/href to another origin, no external scripts or stylesheets
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<script src" not in html and "<link" not in html and "@import" not in html
    assert "'unsafe-inline'" in r.headers["content-security-policy"]
