"""A job's or an evaluation's lease, as the worker holds it: who we are (``new_owner``), the exception that stops
work whose lease another worker took (``LeaseLost``), and the thread that keeps a job's lease through a long
meta-step (``LeaseKeeper``). The lease itself is a row's columns (store/jobs.py); the database, not the broker,
decides who runs a job.
"""
from __future__ import annotations

import ctypes
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


class StepInterrupted(Exception):
    """Raised in the training thread, mid-step, by the ``LeaseKeeper`` (``reason`` says why)."""

    def __init__(self, reason: str = "", cancel: bool = False):
        super().__init__(reason)
        self.reason, self.cancel = reason, cancel


class _Interrupt(Exception):
    """What ``PyThreadState_SetAsyncExc`` raises in the training thread (a class: it cannot carry a message);
    ``LeaseKeeper.step`` turns it into the ``StepInterrupted`` that says why."""


def rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc; None elsewhere: the memory limit is then not enforced)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class LeaseKeeper:
    """The watchdog of a job's meta-steps, a thread beside the training loop (which heartbeats between steps only).

    While a step runs it
    - renews the lease once the step has run for a third of the lease (a step that compiles takes a minute or more
      on a cold cache: longer than the lease, which would hand the job to another worker mid-compile);
    - reads the job's ``cancel_requested`` every ``poll`` seconds, and checks how far this process's resident memory
      has grown over what it held when the keeper started against ``max_growth``, and the step's wall-clock time
      against ``max_step_s``.
    A cancel, a memory or a time limit interrupts the step: an exception raised in the training thread at its next
    Python bytecode (``StepInterrupted``, from ``step``), so the job ends canceled, or failed saying which limit,
    within about ``poll`` seconds. When the step does not reach Python within ``grace`` seconds (one long kernel)
    and ``hard_exit`` is set (a Celery pool child, never a test process), the keeper ends the job's row itself and
    exits the process: the pool replaces it, and the redelivered message finds the job finished."""

    def __init__(self, rt, job_id: str, owner: str, lease_seconds: float, max_step_s: float = 3 * 3600.0,
                 max_growth: int | None = None, poll: float = 1.0, grace: float = 5.0, hard_exit: bool = False):
        self.rt, self.job_id, self.owner, self.lease = rt, job_id, owner, lease_seconds
        self.max_step_s, self.poll, self.grace, self.hard_exit = max_step_s, poll, grace, hard_exit
        self.max_growth, self.rss_base = max_growth, rss_bytes() or 0
        self.busy_since: float | None = None
        self.renewed_at = time.monotonic()
        self.lost = False
        self.renewals = 0
        self.reason: StepInterrupted | None = None
        self._interrupted_at: float | None = None
        self._target = threading.get_ident()  # the training thread
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metashrink-lease", daemon=True)
        self._thread.start()

    def _run(self):
        last_poll = 0.0
        while not self._stop.wait(min(self.poll, self.lease / 6)):
            since, now = self.busy_since, time.monotonic()
            if since is None:
                continue
            if self._interrupted_at is not None:
                if self.hard_exit and now - self._interrupted_at > self.grace:
                    self._exit()
                continue
            if now - since > self.max_step_s:
                self._interrupt(StepInterrupted(f"one meta-step ran for more than {self.max_step_s:.0f} s "
                                                f"(METASHRINK_STEP_TIMEOUT)"))
                continue
            rss = rss_bytes() if self.max_growth else None
            if rss is not None and rss - self.rss_base > self.max_growth:
                self._interrupt(StepInterrupted(
                    f"the training process's memory grew by {(rss - self.rss_base) / 2 ** 30:.2f} GiB in this "
                    f"attempt, above the limit of {self.max_growth / 2 ** 30:.2f} GiB "
                    f"(METASHRINK_JOB_MAX_MEMORY_BYTES); reduce outer.meta_batch, tasks.shots / query / ways or the "
                    f"model's size"))
                continue
            renew = now - self.renewed_at >= self.lease / 3
            if not renew and now - last_poll < self.poll:
                continue
            last_poll = now
            try:
                with self.rt.db.session() as ses:
                    if renew:
                        ok = Q.renew(ses, self.job_id, self.owner, self.lease)
                    cancel = Q.cancel_requested(ses, self.job_id)
            except Exception:  # the database is away for a moment: the next tick tries again
                log.warning("job %s: lease renewal or cancel poll during a step failed", self.job_id, exc_info=True)
                continue
            if renew:
                self.renewed_at = time.monotonic()
                self.renewals += 1
                if not ok:
                    self.lost = True
            if cancel:
                self._interrupt(StepInterrupted("canceled", cancel=True))

    def _interrupt(self, why: StepInterrupted) -> None:
        with self._lock:
            if self.busy_since is None or self.reason is not None:
                return
            self.reason, self._interrupted_at = why, time.monotonic()
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), ctypes.py_object(_Interrupt))
        log.warning("job %s: interrupting the running step: %s", self.job_id, why.reason)

    def _exit(self) -> None:
        """The step did not reach Python within the grace period: end the job's row and this process."""
        why = self.reason
        log.error("job %s: the step did not stop within %.0f s of %s; ending the process", self.job_id, self.grace,
                  why.reason)
        try:
            with self.rt.db.session() as ses:
                Q.finish(ses, self.job_id, self.owner, "canceled" if why.cancel else "failed",
                         error=None if why.cancel else why.reason)
        finally:
            os._exit(1)

    @contextmanager
    def step(self):
        """Around one meta-step: raises ``StepInterrupted`` when the watchdog stopped it, LeaseLost when the lease
        was found gone."""
        self.busy_since = time.monotonic()
        try:
            yield
        except _Interrupt:
            pass  # the reason is raised below
        finally:
            with self._lock:
                self.busy_since = None
                if self.reason is not None:  # an interrupt that was not delivered yet must not land after the step
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), None)
        if self.reason is not None:
            raise self.reason
        if self.lost:
            raise LeaseLost()

    def run_step(self, fn):
        """``fn()`` as one watched step (``step``), an interrupt delivered anywhere in it turned into its reason."""
        try:
            with self.step():
                return fn()
        except _Interrupt:
            raise self.reason

    def beaten(self):
        """The training loop renewed the lease itself."""
        self.renewed_at = time.monotonic()

    def close(self):
        self._stop.set()
        self._thread.join(timeout=5)
