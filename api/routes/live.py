"""Live views: ``GET /v1/jobs/{id}/events`` (Server-Sent Events) and ``GET /dashboard`` (one HTML page).

The event stream polls the job row (the source of truth) every ``interval`` seconds and sends one event per
change: ``status`` (``{"status", "error", "model_id", "best_checkpoint_id"}``), ``progress`` (``{"step",
"total"}``) and ``metrics`` (``{"step", "metrics"}``: the latest metrics the worker wrote). The first poll sends
all three; the stream ends after the ``status`` event of a terminal status (succeeded, failed, canceled).
A comment line (``: keep-alive``) goes out every 15 s without change, so proxies keep the connection open.
"""

import asyncio
import json
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, StreamingResponse

from store.jobs import TERMINAL
from store.models import Job

from ..deps import Tenant
from ..errors import ApiError

KEEPALIVE_S = 15.0
DASHBOARD = Path(__file__).parent.parent / "dashboard.html"

router = APIRouter()


def sse(event: str, data: dict, event_id: int) -> bytes:
    return f"id: {event_id}\nevent: {event}\ndata: {json.dumps(data, default=str)}\n\n".encode()


def snapshot(app, t: str, job_id: str) -> dict:
    with app.state.db.session() as s:
        j = s.get(Job, job_id)
        if j is None or j.tenant != t:
            raise ApiError(404, f"job {job_id} not found")
        return {"status": {"status": j.status, "error": {"message": j.error} if j.error else None,
                           "model_id": j.model_id, "best_checkpoint_id": j.best_checkpoint_id},
                "progress": {"step": j.step, "total": j.total_steps},
                "metrics": {"step": j.step, "metrics": j.metrics or {}}}


@router.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                             "description": "events `status`, `progress`, `metrics`; ends at a terminal status"}})
async def job_events(job_id: str, request: Request, t: Tenant,
                     interval: Annotated[float, Query(ge=0.1, le=10.0)] = 0.5):
    """Server-Sent Events: one event per change of the job's status, progress or latest metrics (the
    database is polled every ``interval`` seconds); the stream ends with the terminal status."""
    first = await run_in_threadpool(snapshot, request.app, t, job_id)  # 401/404 before the stream starts

    async def stream():
        last: dict = {}
        n, snap, quiet_since = 0, first, time.monotonic()
        while True:
            sent = False
            # metrics and progress before status, so the terminal status is the last event
            for kind in ("progress", "metrics", "status"):
                if kind == "metrics" and last.get("metrics", {}).get("metrics") == snap["metrics"]["metrics"]:
                    continue
                if snap[kind] != last.get(kind):
                    n += 1
                    last[kind] = snap[kind]
                    sent = True
                    yield sse(kind, snap[kind], n)
            if snap["status"]["status"] in TERMINAL:
                return
            if sent:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > KEEPALIVE_S:
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            await asyncio.sleep(interval)
            if await request.is_disconnected():
                return
            try:
                snap = await run_in_threadpool(snapshot, request.app, t, job_id)
            except ApiError:  # the job is gone (deleted with its tenant)
                return

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/dashboard", include_in_schema=False, response_class=HTMLResponse)
def dashboard():
    """A self-contained page (inline JS/CSS/SVG, no external assets): paste an API key, pick a job, see
    its loss curves (/v1/jobs/{id}/metrics) and sigma^2 bar chart on a log scale (/v1/jobs/{id}/modules)."""
    return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"),
                        headers={"Cache-Control": "no-cache",
                                 "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; "
                                                            "style-src 'unsafe-inline'; img-src 'self' data:"})
