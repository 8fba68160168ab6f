"""``/healthz`` (the process answers) and ``/readyz`` (database, broker and a worker on every queue)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from ..metrics import workers_by_queue

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz")
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
