"""Uploads under ``metashrink serve`` as a user runs it: its datasets worker is a supervised child that readiness
waits for, and the CLI uploads, waits for ``ready`` and reports the tenant's usage."""
from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from benchmarks.serve_harness import ROOT, Serve

from .test_datasets import _bomb, _sinusoid_csv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-uploads")
    s = Serve(tmp / "data", tmp / "serve.log")
    s.ready()
    yield s
    s.stop()


def test_serve_decodes_uploads_in_its_datasets_worker(serve, tmp_path):
    r = serve.ready()
    assert r["workers"]["datasets"], r
    cmdlines = [" ".join(p.cmdline()) for p in psutil.Process(serve.proc.pid).children(recursive=True)]
    assert any("-Q datasets" in c for c in cmdlines), cmdlines
    f = tmp_path / "sines.csv"
    f.write_bytes(_sinusoid_csv(n_tasks=12))
    cli = [sys.executable, "-m", "client.cli", "datasets"]
    auth = ["--url", serve.url, "--key", serve.key]
    p = subprocess.run(cli + ["upload", str(f), "--kind", "regression", "--min-points", "5", "--wait"] + auth,
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    accepted, done = (json.loads(line) for line in p.stdout.splitlines())
    assert accepted["status"] == "processing" and done["status"] == "ready" and done["tasks"] == 12
    p = subprocess.run(cli + ["list"] + auth, cwd=ROOT, capture_output=True, text=True, timeout=60)
    page = json.loads(p.stdout)
    assert page["usage"] == {"bytes": done["bytes"], "quota": 20 * 1024 ** 3}, page
    # the bomb: 413 from the headers, nothing recorded, the CLI says why without a traceback
    b = tmp_path / "bomb.zip"
    b.write_bytes(_bomb(n=40, side=4096))
    p = subprocess.run(cli + ["upload", str(b), "--kind", "image_classes"] + auth, cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode != 0 and "413" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert "bomb.zip: blank/c0/38.png" in p.stderr
    assert len(json.loads(subprocess.run(cli + ["list"] + auth, cwd=ROOT, capture_output=True, text=True,
                                         timeout=60).stdout)["items"]) == 1
