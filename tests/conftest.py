import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# torch.compile's caches (and execution.compile "auto"'s records of past compiles) in a fresh directory per run:
# "auto" finds no record of an earlier compile, so a test compiles only when its config says compile: true
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _COMPILE_CACHE = tempfile.mkdtemp(prefix="metashrink-tests-compile-")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)

import torch  # noqa: E402

# One intra-op thread: the suite shares 2 cores with the Celery worker processes it starts, and oversubscribed
# BLAS/OpenMP threads were measured ~10x slower than one thread on this machine.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A local S3-protocol server (moto's server mode, tests/s3_helpers.py) for the S3 artifact store's tests."""
    from tests.s3_helpers import MotoServer
    server = MotoServer(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        server.close()
