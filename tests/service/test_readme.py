"""The README's quick start, run as it is written against a live ``metashrink serve``.

The block between ``<!-- quickstart:begin -->`` and ``<!-- quickstart:end -->`` in README.md runs with bash
(``-euo pipefail``: every command must succeed) in a fresh directory that has the repository's ``.venv`` (the
block's ``.venv/bin/...`` paths), after ``serve`` started on a temporary data directory and a free port; only
``METASHRINK_DATA_DIR`` and ``METASHRINK_URL`` point the commands at that server (the README's defaults are
``.metashrink`` and port 8000). The adapt at the end must print the predictions for the two query points.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks.serve_harness import Serve

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def quickstart() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- quickstart:begin -->(.*?)<!-- quickstart:end -->", text, re.S)
    assert m, "README.md has no <!-- quickstart:begin --> ... <!-- quickstart:end --> block"
    blocks = re.findall(r"```(?:bash|sh)\n(.*?)```", m.group(1), re.S)
    assert blocks, "no ```bash block between the quickstart markers"
    return "\n".join(blocks)


def test_readme_quickstart_runs_against_a_live_server(tmp_path):
    script = quickstart()
    work = tmp_path / "work"
    work.mkdir()
    (work / ".venv").symlink_to(ROOT / ".venv")
    serve = Serve(tmp_path / "data", tmp_path / "serve.log")
    try:
        serve.ready()
        env = {k: v for k, v in os.environ.items() if not k.startswith("METASHRINK_")}
        env.update(METASHRINK_DATA_DIR=str(serve.data), METASHRINK_URL=serve.url)
        p = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=work, env=env, capture_output=True,
                           text=True, timeout=1200)
    finally:
        serve.stop()
    assert p.returncode == 0, f"the quick start failed (rc {p.returncode}):\n{p.stdout[-3000:]}\n" \
                              f"{p.stderr[-3000:]}\nserve log: {serve.logpath}"
    lines = p.stdout.strip().splitlines()
    job = json.loads((work / "job.out").read_text().strip().splitlines()[-1])
    assert job["status"] == "succeeded" and job["model_id"], job
    predictions = json.loads(lines[-1])
    assert len(predictions) == 2 and all(len(r) == 1 and math.isfinite(r[0]) for r in predictions), lines[-1]
