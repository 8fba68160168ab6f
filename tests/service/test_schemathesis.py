"""The OpenAPI document as a contract, checked by Schemathesis against the live service on both backends.

Schemathesis's command line (every default check, all four phases: examples, coverage, fuzzing, stateful) runs
for ``METASHRINK_FUZZ_SECONDS`` (60) against a second API instance of the ``service`` fixture served over HTTP,
as a tenant of its own that owns a finished job, its model and checkpoints, and an adapter (so that the model,
adapt, checkpoint and adapter operations are reached, not only their 404s). The run must end with no failure:
no 5xx, no response outside the document (status, content type, headers, body schema), schema-valid requests
accepted (or refused only for rules JSON Schema cannot state: tests/service/schemathesis_hooks.py) and
schema-violating ones refused. tests/service/schemathesis.toml has the one setting that differs from the
defaults and why.

The train worker is stopped during the run: the fuzzer submits hundreds of schema-valid jobs and evaluations
(up to 10^7 meta-steps of 16 x 4096 MLPs), which would load the machine for hours and test the training code,
not the API; they are canceled (jobs) or failed (evaluations) afterwards and the worker is started again. The
adapt worker runs (adapt steps and rows are capped by the fixture's settings).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import update

from .conftest import small_config
from .live_http import served

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
FUZZ_SECONDS = int(os.environ.get("METASHRINK_FUZZ_SECONDS", "60"))
TENANT = "fuzz"


def _prepare(service, key: str) -> dict:
    """The fuzz tenant's data: one finished job (model, checkpoints, module maps) and one adapter."""
    h = {"Authorization": f"Bearer {key}"}
    c = service.client
    r = c.post("/v1/jobs", json=small_config(steps=20), headers=h)
    assert r.status_code == 202, r.text
    jid, t0 = r.json()["id"], time.monotonic()
    while (j := c.get(f"/v1/jobs/{jid}", headers=h).json())["status"] not in ("succeeded", "failed", "canceled"):
        assert time.monotonic() - t0 < 300, j
        time.sleep(0.3)
    assert j["status"] == "succeeded", j
    r = c.post(f"/v1/models/{j['model_id']}/adapt", headers=h, json={
        "support": {"x": [[-1.0], [0.0], [1.0]], "y": [[-0.5], [0.0], [0.5]]}, "query": {"x": [[0.5]]},
        "steps": 5, "save_adapter": True})
    assert r.status_code == 200, r.text
    ckpts = c.get(f"/v1/jobs/{jid}/checkpoints", headers=h).json()["items"]
    return {"job_id": jid, "model_id": j["model_id"], "adapter_id": r.json()["adapter_id"], "ckpt_id": ckpts[0]["id"]}


def _config(path: Path, ids: dict) -> Path:
    """tests/service/schemathesis.toml, plus the fuzz tenant's ids as values the generated path parameters take
    half of the time (the other half: anything the schema admits)."""
    lines = [(ROOT / "tests/service/schemathesis.toml").read_text(), ""]
    for name, value in ids.items():
        lines += [f"[dictionaries.{name}]", f'values = ["{value}"]', ""]
    lines.append("[parameters]")
    lines += [f'"path.{name}" = {{ dictionary = "{name}", probability = 0.5 }}' for name in ids]
    path.write_text("\n".join(lines) + "\n")
    return path


def _settle(service, started: float) -> None:
    """End the fuzz tenant's queued work (nothing ran it), then start the train worker again."""
    from store.models import Evaluation, Job, utcnow
    now = utcnow()
    with service.app.state.db.session() as s:
        s.execute(update(Job).where(Job.tenant == TENANT, Job.status.in_(("queued", "running")))
                  .values(status="canceled", cancel_requested=True, updated_at=now, finished_at=now)
                  .execution_options(synchronize_session=False))
        s.execute(update(Evaluation).where(Evaluation.tenant == TENANT, Evaluation.status.in_(("queued", "running")))
                  .values(status="failed", error="schemathesis run over", updated_at=now, finished_at=now)
                  .execution_options(synchronize_session=False))
    service.start_worker("train")
    while service.client.get("/readyz").status_code != 200:
        assert time.monotonic() - started < 600, service.client.get("/readyz").text
        time.sleep(0.5)


def test_schemathesis_finds_no_server_error_and_no_conformance_failure(service, tmp_path):
    from api import create_app
    from store.keys import create_key

    with service.app.state.db.session() as s:
        key = create_key(s, TENANT)
    ids = _prepare(service, key)
    started = time.monotonic()
    for name in service.worker_names("train"):
        service.kill_worker(name, signal.SIGTERM)
    # a second API process of the same deployment (same database and broker), as uvicorn serves it; the
    # fixture's own instance keeps its reconciler
    app = create_app(service.settings.model_copy(update={"reconciler": False}))
    try:
        with served(app) as url:
            env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.service.schemathesis_hooks",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            cmd = [sys.executable, "-m", "schemathesis.cli",
                   "--config-file", str(_config(tmp_path / "schemathesis.toml", ids)),
                   "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}",
                   "--max-time", str(FUZZ_SECONDS), "--workers", "1", "--request-timeout", "60",
                   "--generation-database", "none", "--no-color",
                   "--report", "junit", "--report-dir", str(tmp_path / "report")]
            p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=FUZZ_SECONDS + 600)
    finally:
        app.state.db.dispose()
        _settle(service, started)
    out = p.stdout + p.stderr
    (tmp_path / "schemathesis.txt").write_text(out)
    summary = out[out.rfind("SUMMARY"):] if "SUMMARY" in out else out[-3000:]
    print(f"schemathesis on {service.kind} ({FUZZ_SECONDS} s; fuzz tenant's {ids}):\n{summary}")
    assert p.returncode == 0, f"schemathesis failed on {service.kind} (full output: {tmp_path / 'schemathesis.txt'}):\n" \
                              f"{out[-12000:]}"
    assert "generated" in summary, summary
