"""Early stopping by validation through the service (run.validate_every / patience), both backends."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load as st_load

from .conftest import small_config

pytestmark = pytest.mark.slow


def _file(service, path):
    r = service.client.get(path, headers=service.h())
    assert r.status_code == 200, r.text
    return st_load(r.content)


def _assert_published_is(service, model_id, ckpt_id):
    model = _file(service, f"/v1/models/{model_id}/file")
    ckpt = _file(service, f"/v1/checkpoints/{ckpt_id}/file")
    assert set(model) == {k for k in ckpt if k.startswith("phi.")} | {"log_sigma2"}
    for k, v in model.items():
        assert torch.equal(v, ckpt[k]), k


def test_validation_marks_best_and_publishes_it(service):
    c, h = service.client, service.h()
    cfg = small_config(steps=30)
    cfg["run"] = {"checkpoint_every": 10, "module_map_every": 10, "log_every": 5, "validate_every": 5,
                  "validation_tasks": 20, "keep_checkpoints": 10}
    jid = service.submit(cfg)
    j = service.wait(jid)
    assert j["status"] == "succeeded", j
    assert j["progress"]["step"] == 30 and "val_mse" in j["metrics"]
    val = c.get(f"/v1/jobs/{jid}/metrics", params={"name": "val_mse"}, headers=h).json()["series"]["val_mse"]
    assert [s for s, _ in val] == [5, 10, 15, 20, 25, 30] and all(v is not None for _, v in val)
    ck = c.get(f"/v1/jobs/{jid}/checkpoints", headers=h).json()
    items = ck["items"]
    assert [x["step"] for x in items] == [5, 10, 15, 20, 25, 30]
    assert [x["val_score"] for x in items] == [v for _, v in val]
    best = [x for x in items if x["best"]]
    assert len(best) == 1 and best[0]["id"] == ck["best_checkpoint_id"] == j["best_checkpoint_id"]
    assert best[0]["val_score"] == min(v for _, v in val)
    _assert_published_is(service, j["model_id"], best[0]["id"])


def test_patience_stops_early(service):
    c, h = service.client, service.h()
    cfg = small_config(steps=100000)
    # min_delta this large: only the first validation can improve, so the job stops at the third
    cfg["run"] = {"checkpoint_every": 100, "module_map_every": 100, "log_every": 5, "validate_every": 3,
                  "validation_tasks": 10, "patience": 2, "min_delta": 1e9}
    jid = service.submit(cfg)
    j = service.wait(jid, timeout=120)
    assert j["status"] == "succeeded", j
    assert j["progress"] == {"step": 9, "total": 100000}
    items = c.get(f"/v1/jobs/{jid}/checkpoints", headers=h).json()["items"]
    assert [(x["step"], x["best"]) for x in items] == [(3, True), (6, False), (9, False)]
    assert c.get(f"/v1/jobs/{jid}/modules", headers=h).json()["step"] == 9
    _assert_published_is(service, j["model_id"], items[0]["id"])


def test_validation_needs_a_val_split_422(service):
    c, h = service.client, service.h()
    cfg = {"algorithm": {"name": "maml"}, "model": {"arch": "conv4", "channels": 8},
           "tasks": {"family": "image_classes", "ways": 5, "shots": 1, "query": 1},
           "run": {"validate_every": 10}}
    r = c.post("/v1/jobs", json=cfg, headers=h)
    assert r.status_code == 422, r.text
    assert "val_fraction" in r.text
    bad = small_config()
    bad["run"] = {"patience": 3}
    r = c.post("/v1/jobs", json=bad, headers=h)
    assert r.status_code == 422 and "patience" in r.text
