"""Sending work to the Celery workers: job and evaluation ids to the ``train`` queue (the database row is the
truth; the reconciler re-sends what the broker lost), accepted uploads to the ``datasets`` queue (the same), and
adapt requests to the ``adapt`` queue with a wait for the reply until the request's deadline."""

import json
import logging
import os
import socket
import threading
import time
import uuid

from fastapi import FastAPI
from fastapi.responses import Response

from store import jobs as Q
from store.settings import Settings
from store.telemetry import ADAPT_LATENCY, ADAPT_REJECTED

from .errors import ApiError, unprocessable

log = logging.getLogger("metashrink.api")


def enqueue(app: FastAPI, job_id: str):
    from worker.celery_app import RUN_JOB, TRAIN_QUEUE
    app.state.celery.send_task(RUN_JOB, args=[job_id], queue=TRAIN_QUEUE)


def enqueue_evaluation(app: FastAPI, eval_id: str):
    from worker.celery_app import RUN_EVALUATION, TRAIN_QUEUE
    app.state.celery.send_task(RUN_EVALUATION, args=[eval_id], queue=TRAIN_QUEUE)


def enqueue_dataset(app: FastAPI, dataset_id: str):
    """An accepted upload to the ``datasets`` queue (its own queue: see worker/dataset_tasks.py)."""
    from worker.celery_app import DATASETS_QUEUE, PROCESS_DATASET
    app.state.celery.send_task(PROCESS_DATASET, args=[dataset_id], queue=DATASETS_QUEUE)


def try_send(send, app: FastAPI, id_: str):
    """Send now if the broker is up; otherwise log it: the reconciler re-sends it once the broker is back."""
    try:
        send(app, id_)
    except Exception:
        log.exception("enqueue of %s failed", id_)


class Reconciler(threading.Thread):
    """Sweeps every ``reconcile_interval`` seconds (``reconcile_once``). The first sweep after start-up and the
    first after the broker comes back re-send every queued job and evaluation and every processing dataset,
    not only stale ones: messages sent while the broker was down, or lost with it, are delivered again (a
    duplicate is harmless: a claim is a conditional UPDATE)."""

    def __init__(self, app: FastAPI):
        super().__init__(daemon=True, name="metashrink-reconciler")
        self.app, self.stop = app, threading.Event()

    def run(self):
        st: Settings = self.app.state.settings
        resend_all = True
        while True:
            try:
                self.app.state.redis.ping()
            except Exception:
                resend_all = True  # the broker is down: sweep the database anyway, re-send everything after
            try:
                reconcile_once(self.app, resend_all)
                resend_all = False
            except Exception:
                log.exception("reconciler sweep failed")
            if self.stop.wait(st.reconcile_interval):
                return


def reconcile_once(app: FastAPI, resend_all: bool = False) -> list[str]:
    st: Settings = app.state.settings
    after = 0.0 if resend_all else st.requeue_queued_after
    with app.state.db.session() as s:
        if st.reap_local_leases and Q.expire_dead_local(s, socket.gethostname(), _alive):
            log.warning("reconciler: leases of dead local workers expired")
        ids = Q.reconcile(s, after)
    for job_id in ids:
        log.info("reconciler: (re-)enqueueing job %s", job_id)
        enqueue(app, job_id)
    with app.state.db.session() as s:
        evs = Q.reconcile_evaluations(s, after)
    for eval_id in evs:
        log.info("reconciler: (re-)enqueueing evaluation %s", eval_id)
        enqueue_evaluation(app, eval_id)
    with app.state.db.session() as s:
        dss = Q.reconcile_datasets(s, after)
    for dataset_id in dss:
        log.info("reconciler: (re-)enqueueing dataset %s", dataset_id)
        enqueue_dataset(app, dataset_id)
    return ids + evs + dss


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- adapt requests
def _send_and_wait(app: FastAPI, tenant: str, target_id: str | None, payload: dict, task: str, route: str):
    from redis.exceptions import RedisError

    from worker.celery_app import ADAPT_HEAVY_QUEUE, ADAPT_QUEUE
    from worker.redis_util import BLPOP_SLICE, reply_key
    from worker.wire import pack

    settings: Settings = app.state.settings
    r = app.state.redis
    # the lane: large adaptations on workers of their own (worker/celery_app.py)
    queue = ADAPT_HEAVY_QUEUE if payload.pop("cost_flops", 0.0) > settings.adapt_heavy_flops else ADAPT_QUEUE
    slot = f"metashrink:adapt-inflight:{tenant}"
    unavailable = ApiError(503, "the broker is unavailable; retry shortly", headers={"Retry-After": "5"})
    try:
        pipe = r.pipeline(transaction=False)  # one round trip
        pipe.incr(slot)
        pipe.expire(slot, int(settings.adapt_timeout) + 60)  # a crashed API process cannot hold slots forever
        n = pipe.execute()[0]
    except RedisError:
        raise unavailable from None
    try:
        if n > settings.adapt_tenant_concurrency:
            raise ApiError(429, f"{n - 1} adapt requests of this tenant are in flight (limit "
                                f"{settings.adapt_tenant_concurrency}); retry when one has finished",
                           headers={"Retry-After": "1"})
        rid = uuid.uuid4().hex
        t0 = time.perf_counter()
        deadline = time.monotonic() + settings.adapt_timeout
        try:
            args = [rid, pack(payload)] if target_id is None else [rid, target_id, pack(payload)]
            # argsrepr: the arrays' base64 is no use in a log line, and Celery's repr of it costs per request
            app.state.celery.send_task(task, args=args, queue=queue, expires=settings.adapt_timeout,
                                       argsrepr=f"[{rid!r}, {target_id!r}, ...]", kwargsrepr="{}")
        except Exception:  # kombu's OperationalError and friends: the broker is down
            log.exception("adapt request %s: send failed", rid)
            raise unavailable from None
        got = None
        while got is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ApiError(504, f"no adapt worker answered within {settings.adapt_timeout:g} s")
            try:  # waits shorter than the client's socket timeout, looped until the deadline
                got = r.blpop([reply_key(rid)], timeout=min(BLPOP_SLICE, max(left, 0.01)))
            except RedisError:
                raise unavailable from None
    finally:
        try:
            r.decr(slot)
        except RedisError:
            pass
    ADAPT_LATENCY.labels(route).observe(time.perf_counter() - t0)
    return got


def check_room(app: FastAPI, tenant: str, what: str) -> None:
    """507 when the tenant's artifacts are already at its quota (METASHRINK_TENANT_QUOTA_BYTES)."""
    from store.datasets import tenant_usage
    quota = app.state.settings.tenant_quota_bytes
    if not quota:
        return
    with app.state.db.session() as s:
        used = tenant_usage(s, tenant)
    if used >= quota:
        msg = (f"the tenant's artifacts store {used:,} bytes, at or over its quota of {quota:,} bytes: no room for "
               f"{what} (GET /v1/usage); delete some or ask for a larger quota")
        raise ApiError(507, msg, [{"loc": ["save_adapter"], "msg": msg}])


def run_adapt(app: FastAPI, tenant: str, target_id: str | None, payload: dict, task: str | None = None):
    """Send one adapt (or adapter predict, or batch predict: ``target_id`` None) request to the adapt queue and
    wait for its reply until the request's deadline (``adapt_timeout``): 504 after it, 503 while the broker is
    unreachable, 429 when the tenant already has ``adapt_tenant_concurrency`` requests in flight. The message
    expires at the deadline, so a worker that reaches it late drops it instead of running work nobody waits for.

    The answer is the worker's JSON as it came (a Response): decoding it and encoding it again through the route's
    response model cost about a millisecond per thousand numbers; the worker builds it in that model's shape."""
    from worker.celery_app import ADAPT

    route = "adapt" if task is None else "adapter_predict" if target_id is not None else "adapters_predict"
    if payload.get("save_adapter"):
        check_room(app, tenant, "an adapter")
    try:
        got = _send_and_wait(app, tenant, target_id, payload, task or ADAPT, route)
    except ApiError as e:
        if e.status in (429, 503, 504):
            ADAPT_REJECTED.labels(route, str(e.status)).inc()
        raise
    if got[1].startswith(b"ok\n"):  # the worker's answer, already the response body (its route's response model)
        return Response(got[1][3:], media_type="application/json")
    out = json.loads(got[1])
    if out.pop("ok"):  # a worker of the version before: a JSON object with "ok": true
        return out
    if out["status"] == 422:
        raise unprocessable(out.get("loc") or ["body"], out["message"])
    if out["status"] in (404, 410):  # deleted meanwhile; its file gone
        raise ApiError(out["status"], out["message"])
    raise ApiError(500, f"adaptation failed: {out['message']}")


def announce_eviction(app: FastAPI, kind: str, id_: str) -> None:
    """Tell the adapt processes that a model or adapter is gone (worker/resident.py drops what it holds of it). A
    broker that is down loses the message: the processes sweep against the database when they subscribe again,
    and a deleted id is refused (404) before anything reaches them."""
    from redis.exceptions import RedisError

    from worker.redis_util import EVICT_CHANNEL
    try:
        app.state.redis.publish(EVICT_CHANNEL, f"{kind}:{id_}")
    except RedisError:
        log.warning("eviction of %s %s not announced (broker unreachable)", kind, id_)
