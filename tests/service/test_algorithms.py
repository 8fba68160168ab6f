"""The comparison algorithms (issue 5) through the service, as a user runs them: submit a job that selects the
algorithm, meta-train it on a real worker, checkpoint and publish it, adapt the published model to a support
set (the algorithm's own inner rule and meta-learned tensors), keep an adapter and predict with it, evaluate."""
from __future__ import annotations

import math

import numpy as np
import pytest
from safetensors.torch import load as st_load

from .conftest import small_config
from .test_evaluations import wait_eval

pytestmark = pytest.mark.slow

# algorithm config -> the meta-learned tensors of its own that the checkpoint must carry (core/baselines.py)
ALGORITHMS = [
    ({"name": "meta_sgd"}, "extra.alpha."),
    ({"name": "tnet"}, "extra.T."),
    ({"name": "mtnet", "temperature": 0.5}, "extra.zeta."),
    ({"name": "hypernet", "embedding": "compressed"}, "extra.template."),
    ({"name": "hyper_representation"}, "extra.eta"),
    ({"name": "maml", "second_order": "hvp"}, None),
]


@pytest.mark.parametrize("alg,extra_prefix", ALGORITHMS, ids=[a["name"] + ("_hvp" if "second_order" in a else "")
                                                               for a, _ in ALGORITHMS])
def test_algorithm_trains_publishes_adapts_and_evaluates(service, alg, extra_prefix):
    c, h = service.client, service.h()
    cfg = small_config(steps=20, algorithm=alg, inner={"optimizer": "sgd", "lr": 0.01, "steps": 3},
                       outer={"meta_batch": 5, "steps": 20, "lr_phi": 0.003, "clip_grad_norm": 10.0})
    j = service.wait(service.submit(cfg))
    assert j["status"] == "succeeded", j
    assert j["progress"] == {"step": 20, "total": 20} and j["model_id"]
    assert math.isfinite(j["metrics"]["query_loss"]) and math.isfinite(j["metrics"]["grad_norm"])

    ck = c.get(f"/v1/jobs/{j['id']}/checkpoints", headers=h).json()["items"]
    assert [x["step"] for x in ck] == [10, 20]
    mid = j["model_id"]
    m = c.get(f"/v1/models/{mid}", headers=h).json()
    assert m["config"]["algorithm"]["name"] == alg["name"]
    tensors = st_load(c.get(f"/v1/models/{mid}/file", headers=h).content)
    if extra_prefix is not None:
        assert any(k.startswith(extra_prefix) for k in tensors), sorted(tensors)

    # adapt the published model to a held-out sinusoid, keep the adapter, predict with it
    xs = np.linspace(-4.5, 4.5, 10)
    xq = [[v] for v in np.linspace(-5, 5, 25)]
    body = {"support": {"x": [[v] for v in xs], "y": [[v] for v in 2.5 * np.sin(xs - 0.7)]},
            "query": {"x": xq}, "steps": 15, "modules": "all", "save_adapter": True}
    a = c.post(f"/v1/models/{mid}/adapt", json=body, headers=h)
    assert a.status_code == 200, a.text
    a = a.json()
    assert len(a["predictions"]) == 25 and all(math.isfinite(v[0]) for v in a["predictions"])
    assert len(a["loss_curve"]) == 16 and a["loss_curve"][-1] < a["loss_curve"][0], a["loss_curve"]
    assert a["adapted_modules"] and a["adapter_id"]
    p = c.post(f"/v1/adapters/{a['adapter_id']}/predict", json={"x": xq}, headers=h)
    assert p.status_code == 200, p.text
    np.testing.assert_allclose(np.array(p.json()["predictions"]), np.array(a["predictions"]), rtol=1e-6, atol=1e-6)

    r = c.post(f"/v1/models/{mid}/evaluations", headers=h, json={"n_tasks": 8, "steps": [0, 3], "modules": "all"})
    assert r.status_code == 202, r.text
    e = wait_eval(service, r.json()["id"])
    assert e["status"] == "succeeded", e
    assert [x["step"] for x in e["results"]] == [0, 3]
    assert all(math.isfinite(x["mean"]) for x in e["results"])


@pytest.mark.parametrize("alg,inner,loc,needle", [
    ({"name": "tnet"}, {"optimizer": "proximal_gd"}, [], "inner.optimizer must be 'sgd'"),
    ({"name": "mtnet", "temperature": 0}, {"optimizer": "sgd"}, ["algorithm", "mtnet", "temperature"], ""),
    ({"name": "hypernet", "embedding": "huge"}, {"optimizer": "sgd"}, ["algorithm", "hypernet", "embedding"], ""),
    ({"name": "maml", "second_order": "hvp", "first_order": True}, {"optimizer": "sgd"}, [], "first_order"),
    ({"name": "meta_sgd", "granularity": "row"}, {"optimizer": "sgd"}, ["algorithm", "meta_sgd", "granularity"], ""),
])
def test_algorithm_config_422(service, alg, inner, loc, needle):
    r = service.client.post("/v1/jobs", json=small_config(algorithm=alg, inner=inner), headers=service.h())
    assert r.status_code == 422, r.text
    body = r.json()
    assert any(e["loc"][:len(loc)] == loc for e in body["errors"]), body
    assert needle in body["detail"], body["detail"]
