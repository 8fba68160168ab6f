"""``GET /metrics``: the Prometheus exposition of ``store.telemetry``'s counters (all processes in multiprocess
mode) plus gauges read at scrape time from the database and the broker."""
from __future__ import annotations

import logging
import os
import time

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

from store.models import Evaluation, Job

log = logging.getLogger("metashrink.api")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "canceled")
EVAL_STATUSES = ("queued", "running", "succeeded", "failed")


def workers_by_queue(app: FastAPI, timeout: float = 1.0) -> dict:
    """Worker names per queue, from a Celery broadcast (``active_queues``; ``timeout`` seconds for the replies).
    Empty when the broker cannot be reached."""
    try:
        replies = app.state.celery.control.inspect(timeout=timeout).active_queues() or {}
    except Exception:
        log.exception("worker inspection failed")
        return {}
    out: dict = {}
    for name, queues in replies.items():
        for q in queues:
            out.setdefault(q["name"], []).append(name)
    return {q: sorted(v) for q, v in out.items()}


class SharedState:
    """Gauges of state every API process sees alike; errors leave a gauge out rather than fail the scrape."""

    def __init__(self, app: FastAPI):
        self.app = app
        self._workers = (0.0, {})

    def _cached_workers(self) -> dict:
        t, w = self._workers
        if time.monotonic() - t > 10:  # one broadcast per 10 s, however often the scrapes come
            self._workers = (time.monotonic(), workers_by_queue(self.app))
        return self._workers[1]

    def collect(self):
        from worker.celery_app import QUEUES
        try:
            with self.app.state.db.session() as s:
                jobs = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                evs = dict(s.execute(select(Evaluation.status, func.count()).group_by(Evaluation.status)).all())
            g = GaugeMetricFamily("metashrink_jobs", "Jobs by status.", labels=["status"])
            for st in JOB_STATUSES:
                g.add_metric([st], jobs.get(st, 0))
            yield g
            g = GaugeMetricFamily("metashrink_evaluations", "Evaluations by status.", labels=["status"])
            for st in EVAL_STATUSES:
                g.add_metric([st], evs.get(st, 0))
            yield g
        except Exception:
            log.exception("metrics: database unavailable")
        try:
            r = self.app.state.redis
            depth = {q: r.llen(q) for q in QUEUES}  # kombu's redis transport: one list each
        except Exception:
            log.exception("metrics: broker unavailable")
            return
        g = GaugeMetricFamily("metashrink_queue_depth", "Messages waiting in each queue.", labels=["queue"])
        for q, n in depth.items():
            g.add_metric([q], n)
        yield g
        workers = self._cached_workers()
        g = GaugeMetricFamily("metashrink_workers", "Workers consuming each queue (Celery broadcast, cached 10 s).",
                              labels=["queue"])
        for q in QUEUES:
            g.add_metric([q], len(workers.get(q, [])))
        yield g


def install(app: FastAPI) -> None:
    registry = CollectorRegistry()
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.MultiProcessCollector(registry)
    else:
        registry.register(_Default())
    registry.register(SharedState(app))

    @app.get("/metrics", tags=["health"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
    def prometheus_metrics():
        """Prometheus text format: jobs and evaluations by status, queue depth and workers per queue (read at
        scrape time), adapt latency and rejections, meta-steps run and supervisor restarts (all processes
        reporting into ``PROMETHEUS_MULTIPROC_DIR``, else this process)."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class _Default:
    """This process's ``store.telemetry`` metrics (the default registry), without the process/platform
    collectors' noise."""

    def collect(self):
        for m in REGISTRY.collect():
            if m.name.startswith("metashrink_"):
                yield m
