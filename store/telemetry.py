"""Prometheus metrics shared by the API, the workers and the embedded supervisor (``prometheus_client``).

With ``PROMETHEUS_MULTIPROC_DIR`` set (``metashrink serve`` sets it to ``<data_dir>/prometheus`` for itself
and its workers; set it yourself for several uvicorn processes on one host) every process writes its counters
and histograms there and ``/metrics`` reports them together; without it, ``/metrics`` has the API process's own.
The variable must be set before ``prometheus_client`` is first imported.

Gauges that describe shared state (jobs and evaluations by status, queue depth, workers per queue) are read at
scrape time by ``api.metrics`` from the database and the broker, so they agree across API processes.
"""
from __future__ import annotations

from prometheus_client import Counter, Histogram

ADAPT_LATENCY = Histogram("metashrink_adapt_latency_seconds", "Adapt and adapter-predict latency through the adapt "
                          "queue (request sent to result received).", ["route"],
                          buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0))
ADAPT_REJECTED = Counter("metashrink_adapt_rejected", "Adapt requests refused: 429 (tenant at its concurrency "
                         "limit), 503 (broker unreachable), 504 (deadline passed).", ["route", "status"])
META_STEPS = Counter("metashrink_meta_steps", "Meta-steps run by the train workers (rate() is the meta-step "
                     "rate).", ["algorithm"])
RESTARTS = Counter("metashrink_supervisor_restarts", "Children of the embedded default restarted by its "
                   "supervisor.", ["child"])
