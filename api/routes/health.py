"""``/healthz`` (the process answers) and ``/readyz`` (database, broker and a worker on every queue)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ..metrics import workers_by_queue

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz():  # on the event loop: a liveness probe never waits for a server thread
    return {"status": "ok"}


READY = {"type": "object", "required": ["status", "checks", "workers"], "properties": {
    "status": {"type": "string", "enum": ["ok", "unavailable"]},
    "checks": {"type": "object", "additionalProperties": {"type": "string"},
               "description": "database, broker, workers: 'ok' or 'error: ...'"},
    "workers": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}},
                "description": "queue -> the workers consuming it"}}}


@router.get("/readyz", responses={
    200: {"description": "ready", "content": {"application/json": {"schema": READY}}},
    503: {"description": "not ready: a check failed (the body says which)",
          "content": {"application/json": {"schema": READY}}}})
def readyz(request: Request):
    app = request.app
    checks = {}
    try:
        with app.state.db.engine.connect() as c:
            c.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"error: {type(e).__name__}"
    try:
        app.state.redis.ping()
        checks["broker"] = "ok"
    except Exception as e:
        checks["broker"] = f"error: {type(e).__name__}"
    from worker.celery_app import QUEUES
    workers = workers_by_queue(app) if checks["broker"] == "ok" else {}
    missing = [q for q in QUEUES if not workers.get(q)]
    checks["workers"] = f"error: no worker consumes {', '.join(missing)}" if missing else "ok"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks, "workers": workers},
                        status_code=200 if ok else 503)
