"""Start Celery worker processes (used by ``metashrink serve`` and by the tests)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from .embedded import start_process

ROOT = Path(__file__).resolve().parent.parent


def worker_command(queues: str, name: str, concurrency: int = 1, loglevel: str = "INFO") -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app:app", "worker", "-Q", queues,
            "-n", f"{name}@%h", "-c", str(concurrency), "--pool", "prefork", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle", "--without-heartbeat"]


def start_worker(queues: str, name: str, env: dict | None = None, concurrency: int = 1, log_path=None,
                 torch_threads: int | None = None) -> subprocess.Popen:
    """A worker in its own session (parent and prefork children signalled together) that dies with the
    thread that started it."""
    e = dict(os.environ if env is None else env)
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    if torch_threads:
        e["METASHRINK_TORCH_THREADS"] = str(torch_threads)
    return start_process(worker_command(queues, name, concurrency), log_path, env=e, cwd=str(ROOT))
