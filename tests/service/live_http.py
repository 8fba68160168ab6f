"""An app served over real HTTP from a thread of the test process (uvicorn), for clients that need a URL:
Schemathesis's command line and headless Chromium."""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import uvicorn

from benchmarks.serve_harness import free_port


@contextmanager
def served(app, timeout: float = 30.0):
    """Yield ``http://127.0.0.1:PORT`` while uvicorn serves ``app`` (its lifespan included)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - t0 < timeout, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
