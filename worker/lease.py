"""A job's or an evaluation's lease, as the worker holds it: who we are (``new_owner``), the exception that stops
work whose lease another worker took (``LeaseLost``), and the thread that keeps a job's lease through a long
meta-step (``LeaseKeeper``). The lease itself is a row's columns (store/jobs.py); the database, not the broker,
decides who runs a job.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager

from store import jobs as Q

log = logging.getLogger("metashrink.worker")


class LeaseLost(Exception):
    """Another worker owns the job now (our lease expired): stop without writing anything more."""


def new_owner() -> str:
    """The lease owner of one claim: host, process and a random suffix (a redelivery claims anew)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseKeeper:
    """Renews a job's lease from a thread while one meta-step runs for longer than a third of the lease (the
    training loop beats between steps only, and a step that compiles takes a minute or more on a cold cache:
    longer than the lease, which would hand the job to another worker mid-compile). It renews nothing while no
    step runs, or once one step has run for ``max_step_s`` (a hung step then loses its lease as before)."""

    def __init__(self, rt, job_id: str, owner: str, lease_seconds: float, max_step_s: float = 3 * 3600.0):
        self.rt, self.job_id, self.owner, self.lease = rt, job_id, owner, lease_seconds
        self.max_step_s = max_step_s
        self.busy_since: float | None = None
        self.renewed_at = time.monotonic()
        self.lost = False
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metashrink-lease", daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self.lease / 6):
            since, now = self.busy_since, time.monotonic()
            if since is None or now - self.renewed_at < self.lease / 3 or now - since > self.max_step_s:
                continue
            try:
                with self.rt.db.session() as ses:
                    ok = Q.renew(ses, self.job_id, self.owner, self.lease)
            except Exception:  # the database is away for a moment: the next tick tries again
                log.warning("job %s: lease renewal during a long step failed", self.job_id, exc_info=True)
                continue
            self.renewed_at = time.monotonic()
            self.renewals += 1
            if not ok:
                self.lost = True

    @contextmanager
    def step(self):
        self.busy_since = time.monotonic()
        try:
            yield
        finally:
            self.busy_since = None
        if self.lost:
            raise LeaseLost()

    def beaten(self):
        """The training loop renewed the lease itself."""
        self.renewed_at = time.monotonic()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
