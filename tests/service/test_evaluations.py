"""Evaluations through the service (issue 4): POST /v1/models/{id}/evaluations, GET /v1/evaluations/{id}, and
one end-to-end Omniglot job trained on the uploaded official zips whose evaluation beats chance widely."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

OMNIGLOT = Path("/work/shared/data/omniglot")


def wait_eval(service, eval_id, timeout=300, tenant="alice"):
    t0 = time.monotonic()
    while True:
        r = service.client.get(f"/v1/evaluations/{eval_id}", headers=service.h(tenant))
        assert r.status_code == 200, r.text
        e = r.json()
        if e["status"] in ("succeeded", "failed"):
            return e
        assert time.monotonic() - t0 < timeout, e
        time.sleep(0.2)


def test_evaluation_sinusoid(service, reference):
    c, h = service.client, service.h()
    mid = reference[1]["model_id"]
    r = c.post(f"/v1/models/{mid}/evaluations", headers=h,
               json={"n_tasks": 30, "steps": [0, 10], "modules": "selected", "split": "test"})
    assert r.status_code == 202, r.text
    eid = r.json()["id"]
    each = c.post(f"/v1/models/{mid}/evaluations", headers=h, json={"n_tasks": 10, "steps": [0, 5], "modules": "each"})
    assert each.status_code == 202
    e = wait_eval(service, eid)
    assert e["status"] == "succeeded", e
    assert e["metric"] == "mse" and e["model_id"] == mid and e["progress"] == {"done": 30, "total": 30}
    assert [(x["step"], x["modules"]) for x in e["results"]] == [(0, "selected"), (10, "selected")]
    for x in e["results"]:
        assert math.isfinite(x["mean"]) and x["mean"] > 0 and x["ci95"] > 0
    e = wait_eval(service, each.json()["id"])
    assert e["status"] == "succeeded", e
    assert len(e["results"]) == 2 * 6 and {x["modules"] for x in e["results"]} == set(
        m["name"] for m in c.get(f"/v1/models/{mid}", headers=h).json()["module_map"])
    assert eid in [x["id"] for x in c.get(f"/v1/models/{mid}/evaluations", headers=h).json()["items"]]
    # tenant-scoped
    bob = service.h("bob")
    assert c.get(f"/v1/evaluations/{eid}", headers=bob).status_code == 404
    assert c.post(f"/v1/models/{mid}/evaluations", headers=bob, json={}).status_code == 404


@pytest.mark.parametrize("body,loc", [
    ({"n_tasks": 0}, ["n_tasks"]),
    ({"steps": []}, ["steps"]),
    ({"steps": [-1, 2]}, ["steps", 0]),
    ({"steps": [0, 2001]}, ["steps"]),
    ({"modules": "some"}, ["modules"]),
    ({"modules": ["nope"]}, ["modules"]),
    ({"split": "holdout"}, ["split"]),
    ({"extra": 1}, ["extra"]),
    ("[1]", ["body"]),
    ("{bad", ["body"]),
])
def test_evaluation_422(service, reference, body, loc):
    mid = reference[1]["model_id"]
    kw = {"content": body.encode(), "headers": {**service.h(), "Content-Type": "application/json"}} \
        if isinstance(body, str) else {"json": body, "headers": service.h()}
    r = service.client.post(f"/v1/models/{mid}/evaluations", **kw)
    assert r.status_code == 422, r.text
    assert any(e["loc"][:len(loc)] == loc for e in r.json()["errors"]), r.json()


@pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").exists(), reason="Omniglot zips not present")
def test_omniglot_upload_train_evaluate(service):
    """Both official minimal zips uploaded as they are, combined by a list of ids (Greek and Latin, in both,
    count once), a small MAML conv4 job (5-way 1-shot, rotations, held-out characters), then an evaluation on
    the test split: accuracy far above chance (0.2)."""
    c, h = service.client, service.h()
    ids = []
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        d = service.upload_ready((OMNIGLOT / name).read_bytes(), "image_classes", name)
        assert d["images_per_class"] == {"min": 20, "max": 20} and d["image_shape"] == [105, 105]
        ids.append(d["id"])
    cfg = {"algorithm": {"name": "maml"}, "model": {"arch": "conv4", "channels": 16},
           "tasks": {"dataset_id": ids, "ways": 5, "shots": 1, "query": 5, "image_size": 28, "rotations": True,
                     "split": {"by": "class", "test_fraction": 0.2, "seed": 0}},
           "inner": {"lr": 0.4, "steps": 1}, "outer": {"steps": 150, "meta_batch": 8, "lr_phi": 3e-3},
           "execution": {"device": "cpu", "vectorize": "vmap"},
           "run": {"checkpoint_every": 50, "module_map_every": 50, "log_every": 10}, "seed": 0}
    j = service.wait(service.submit(cfg), timeout=600)
    assert j["status"] == "succeeded", j
    r = c.post(f"/v1/models/{j['model_id']}/evaluations", headers=h,
               json={"n_tasks": 100, "steps": [0, 3], "modules": "all", "split": "test"})
    assert r.status_code == 202, r.text
    e = wait_eval(service, r.json()["id"], timeout=300)
    assert e["status"] == "succeeded" and e["metric"] == "accuracy", e
    acc = {x["step"]: x for x in e["results"]}
    print("omniglot via service:", {s: (round(a["mean"], 3), round(a["ci95"], 3)) for s, a in acc.items()})
    assert acc[3]["mean"] - acc[3]["ci95"] > 0.5
