"""POST /v1/adapters/predict on both backends: many adapters' predictions in one request (issue 14 item 4).

The batch answers what the adapters answer one by one (POST /v1/adapters/{id}/predict), to 1e-6, for adapters of
one model with different module choices and query sizes, and across two models; errors name the item; another
tenant's adapter is 404; a deleted adapter or model leaves the adapt process's memory at once."""
from __future__ import annotations

import time

import numpy as np
import pytest

from .conftest import small_config


def _adapter(service, mid, modules="selected", seed=0, tenant="alice"):
    rng = np.random.default_rng(seed)
    xs = rng.uniform(-4, 4, 8)
    r = service.client.post(f"/v1/models/{mid}/adapt", headers=service.h(tenant), json={
        "support": {"x": xs[:, None].tolist(), "y": (rng.uniform(0.5, 3) * np.sin(xs))[:, None].tolist()},
        "query": {"x": [[0.0]]}, "steps": 10, "modules": modules, "save_adapter": True})
    assert r.status_code == 200, r.text
    return r.json()["adapter_id"]


@pytest.fixture(scope="module")
def second_model(service):
    """A model of another architecture (one hidden layer of 8), so that a batch spans two groups."""
    cfg = small_config(steps=10, seed=3)
    cfg["model"] = {"arch": "mlp", "hidden": [8]}
    j = service.wait(service.submit(cfg))
    assert j["status"] == "succeeded", j
    return j["model_id"]


def test_batch_equals_one_by_one_for_mixed_adapters_and_two_models(service, reference, second_model):
    c, h = service.client, service.h()
    mid = reference[1]["model_id"]
    aids = [_adapter(service, mid, m, seed=i) for i, m in
            enumerate(["selected", "all", ["fc2.weight", "fc2.bias"], ["fc0.weight"], "all"])]
    aids += [_adapter(service, second_model, m, seed=10 + i) for i, m in enumerate(["all", ["fc1.bias"]])]
    rng = np.random.default_rng(7)
    rows = [6, 6, 6, 3, 40, 6, 1, 6]  # shared and distinct query sizes; the first adapter named twice
    items = [{"adapter_id": a, "x": rng.uniform(-5, 5, (n, 1)).tolist()} for a, n in zip(aids + aids[:1], rows)]
    r = c.post("/v1/adapters/predict", json={"items": items}, headers=h)
    assert r.status_code == 200, r.text
    got = r.json()["items"]
    assert [g["adapter_id"] for g in got] == [it["adapter_id"] for it in items]
    for it, g in zip(items, got):
        one = c.post(f"/v1/adapters/{it['adapter_id']}/predict", json={"x": it["x"]}, headers=h)
        assert one.status_code == 200, one.text
        np.testing.assert_allclose(np.array(g["predictions"]), np.array(one.json()["predictions"]), rtol=1e-6,
                                   atol=1e-6)
        assert np.array(g["predictions"]).shape == (len(it["x"]), 1)


def test_batch_errors_name_the_item_and_other_tenants_adapters_are_404(service, reference):
    c, h, bob = service.client, service.h(), service.h("bob")
    mid = reference[1]["model_id"]
    mine = _adapter(service, mid, seed=20)
    ok = {"adapter_id": mine, "x": [[0.5]]}

    def post(body, headers=h):
        return c.post("/v1/adapters/predict", json=body, headers=headers)
    r = post({"items": [ok, {"adapter_id": "adp_0000000000nothere00", "x": [[0.5]]}]})
    assert r.status_code == 404 and r.json()["errors"][0]["loc"] == ["items", 1, "adapter_id"], r.text
    # alice's adapter is not bob's: 404 as for an unknown id, and nothing of it in the answer
    r = post({"items": [ok]}, bob)
    assert r.status_code == 404 and mine in r.json()["detail"], r.text
    jb = service.wait(service.submit(small_config(steps=5, seed=6), tenant="bob"), tenant="bob")
    bobs = _adapter(service, jb["model_id"], seed=21, tenant="bob")
    assert post({"items": [{"adapter_id": bobs, "x": [[0.5]]}, ok]}, bob).status_code == 404
    assert post({"items": [{"adapter_id": bobs, "x": [[0.5]]}]}, bob).status_code == 200
    for body, loc in (({"items": [ok, {"adapter_id": mine, "x": [[1.0, 2.0]]}]}, ["items", 1, "x"]),
                      ({"items": [{"adapter_id": mine, "x": [[1.0], [1.0, 2.0]]}]}, ["items", 0, "x"]),
                      ({"items": [{"adapter_id": mine, "x": []}]}, ["items", 0, "x"]),
                      ({"items": []}, ["items"]),
                      ({"items": [{**ok, "y": 1}]}, ["items", 0, "y"]),
                      ({"items": [{"adapter_id": "../x", "x": [[0.5]]}]}, ["items", 0, "adapter_id"]),
                      ({"items": [ok] * (service.settings.adapt_batch_max_items + 1)}, ["items"]),
                      ({"items": [{"adapter_id": mine, "x": [[0.5]] * (service.settings.adapt_max_rows + 1)}]},
                       ["items", 0, "x"]),
                      ([ok], [])):  # a bare list: the body itself is refused
        r = post(body)
        assert r.status_code == 422, (body if len(str(body)) < 300 else loc, r.text[:300])
        assert any(e["loc"][:len(loc)] == loc for e in r.json()["errors"]), (loc, r.json()["errors"][:2])
    assert c.post("/v1/adapters/predict", json={"items": [ok]}).status_code == 401


def test_deleting_an_adapter_or_model_drops_it_from_the_adapt_process(service):
    c, h = service.client, service.h()
    j = service.wait(service.submit(small_config(steps=10, seed=5)))
    mid = j["model_id"]
    a1, a2 = _adapter(service, mid, seed=30), _adapter(service, mid, seed=31)
    r = c.post("/v1/adapters/predict", headers=h, json={"items": [{"adapter_id": a, "x": [[0.5]]} for a in (a1, a2)]})
    assert r.status_code == 200, r.text  # both held by the adapt process now
    log = service.logdir / "worker-adapt.log"

    def dropped(what):
        t0 = time.monotonic()
        while f"adapt cache: dropped {what}" not in log.read_text():
            assert time.monotonic() - t0 < 20, f"{what} never dropped; see {log}"
            time.sleep(0.1)
    assert c.delete(f"/v1/adapters/{a1}", headers=h).status_code == 204
    dropped(a1)
    r = c.post("/v1/adapters/predict", headers=h, json={"items": [{"adapter_id": a1, "x": [[0.5]]}]})
    assert r.status_code == 404
    assert c.delete(f"/v1/models/{mid}", headers=h).status_code == 204
    dropped(f"{mid}, {a2}")
    assert c.post(f"/v1/adapters/{a2}/predict", headers=h, json={"x": [[0.5]]}).status_code == 404
