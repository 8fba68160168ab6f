"""The Python client (client/sdk.py) against the live service over HTTP, one method group per resource: jobs
(submit, wait, job, jobs, cancel, retry, metrics, modules, checkpoints, a checkpoint's file, the event stream),
models (list, get, file, adapt), adapters (get, predict, predict_many), evaluations (create, get, list, wait) and datasets
(upload, get, list), as a tenant of its own."""
from __future__ import annotations

import hashlib
import math
import random

import pytest

from client.sdk import ApiError, Client

from .conftest import small_config
from .live_http import served

TENANT = "sdk"


def _points_csv(n_tasks=12, points=12) -> bytes:
    rng = random.Random(0)
    rows = ["task,x,y"]
    for t in range(n_tasks):
        a, ph = rng.uniform(0.5, 2), rng.uniform(0, 3)
        for _ in range(points):
            x = rng.uniform(-5, 5)
            rows.append(f"t{t},{x:.4f},{a * math.sin(x + ph):.4f}")
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture
def sdk(service):
    from api import create_app
    from store.keys import create_key
    with service.app.state.db.session() as s:
        key = create_key(s, TENANT)
    app = create_app(service.settings.model_copy(update={"reconciler": False}))  # a second API process
    try:
        with served(app) as url:
            yield Client(url, key, timeout=120)
    finally:
        app.state.db.dispose()


def test_client_has_a_method_for_every_resource(sdk: Client, tmp_path):
    c = sdk
    # jobs
    jid = c.submit(small_config(steps=20, seed=3), idempotency_key="sdk-1")["id"]
    assert c.submit(small_config(steps=20, seed=3), idempotency_key="sdk-1")["id"] == jid
    j = c.wait(jid, poll=0.2, timeout=300)
    assert j["status"] == "succeeded", j
    assert c.job(jid)["config"]["seed"] == 3
    assert [x["id"] for x in c.jobs(status="succeeded")["items"]] == [jid]
    assert c.metrics(jid)["series"]["query_loss"]
    assert c.modules(jid)["modules"]
    events = list(c.events(jid, interval=0.1))
    assert [e["event"] for e in events][-1] == "status" and events[-1]["data"]["status"] == "succeeded", events
    assert events[-1]["data"]["model_id"] == j["model_id"]
    ckpts = c.checkpoints(jid)["items"]
    assert [k["step"] for k in ckpts][-1] == 20
    u = c.usage()
    assert u["bytes"]["checkpoints"] >= sum(k["bytes"] for k in ckpts) and u["limits"]["keep_checkpoints"] >= 1
    path = c.download_checkpoint(ckpts[-1]["id"], tmp_path)
    assert path.name == f"{ckpts[-1]['id']}.safetensors"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == ckpts[-1]["sha256"]
    with pytest.raises(ApiError) as e:
        c.retry(jid)
    assert e.value.status == 409
    long = c.submit(small_config(steps=5000, seed=4))["id"]
    c.cancel(long)
    assert c.wait(long, poll=0.2, timeout=120)["status"] == "canceled"
    assert c.retry(long)["status"] == "queued"
    c.cancel(long)
    assert c.wait(long, poll=0.2, timeout=120)["status"] == "canceled"
    with pytest.raises(ApiError) as e:
        list(c.events("job_nope"))
    assert e.value.status == 404

    # models, adapt, adapters
    mid = j["model_id"]
    assert [m["id"] for m in c.models()["items"]] == [mid]
    m = c.model(mid)
    path = c.download_model(mid, tmp_path / "model.safetensors")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == m["sha256"]
    support = {"x": [[-1.0], [0.0], [1.0]], "y": [[-0.5], [0.0], [0.5]]}
    a = c.adapt(mid, support, {"x": [[0.5], [2.0]]}, steps=5, save_adapter=True)
    assert len(a["predictions"]) == 2 and a["adapter_id"]
    ad = c.adapter(a["adapter_id"])
    assert ad["model_id"] == mid and ad["steps"] == 5
    p = c.predict(a["adapter_id"], [[0.5], [2.0]])
    assert [r[0] for r in p["predictions"]] == pytest.approx([r[0] for r in a["predictions"]], abs=1e-5)
    many = c.predict_many([(a["adapter_id"], [[0.5], [2.0]]), {"adapter_id": a["adapter_id"], "x": [[2.0]]}])
    assert [len(x) for x in many] == [2, 1]
    assert [r[0] for r in many[0]] == pytest.approx([r[0] for r in p["predictions"]], abs=1e-6)

    # evaluations
    ev = c.evaluate(mid, n_tasks=4, steps=[0, 2], seed=1)
    assert ev["status"] == "queued"
    done = c.wait_evaluation(ev["id"], poll=0.3, timeout=300)
    assert done["status"] == "succeeded" and [r["step"] for r in done["results"]] == [0, 2], done
    assert c.evaluation(ev["id"])["results"] == done["results"]
    assert [x["id"] for x in c.evaluations(mid)["items"]] == [ev["id"]]

    # datasets
    d = c.upload_dataset(_points_csv(), "regression", name="points", filename="points.csv", wait=True, timeout=120)
    assert d["status"] == "ready" and d["tasks"] == 12, d
    assert c.dataset(d["id"])["name"] == "points"
    assert [x["id"] for x in c.datasets()["items"]] == [d["id"]]
