"""Start Celery worker processes (used by ``metashrink serve`` and by the tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker_command(queues: str, name: str, concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "-Q", queues,
            "-n", f"{name}@%h", "-c", str(concurrency), "--pool", "prefork", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle", "--without-heartbeat"]


def start_worker(queues: str, name: str, env: dict | None = None, concurrency: int = 1, log_path=None,
                 torch_threads: int | None = None) -> subprocess.Popen:
    """A worker in its own session, so that the whole process group (parent + prefork child) can be
    signalled together."""
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    if torch_threads:
        e["METASHRINK_TORCH_THREADS"] = str(torch_threads)
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(worker_command(queues, name, concurrency), env=e, cwd=str(ROOT), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
