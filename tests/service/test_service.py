"""End-to-end service tests, run against both backends (see conftest.py)."""
from __future__ import annotations

import hashlib
import json
import math
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from .conftest import small_config

pytestmark = pytest.mark.slow


def _sinusoid(amp, phase, x):
    return (amp * np.sin(x - phase)).tolist()


def _model_tensors(service, model_id):
    r = service.client.get(f"/v1/models/{model_id}/file", headers=service.h())
    assert r.status_code == 200
    return st_load(r.content)


# --------------------------------------------------------------------------- lifecycle
def test_lifecycle(service, reference):
    c, h = service.client, service.h()
    jid, j = reference
    assert j["progress"] == {"step": 40, "total": 40}
    assert j["error"] is None and j["model_id"]
    assert set(j["metrics"]) >= {"query_loss"}

    series = c.get(f"/v1/jobs/{jid}/metrics", headers=h).json()["series"]
    assert [s for s, _ in series["query_loss"]] == list(range(1, 41))

    mods = c.get(f"/v1/jobs/{jid}/modules", headers=h).json()
    assert mods["step"] == 40 and mods["steps"] == [10, 20, 30, 40]
    assert len(mods["modules"]) == 6  # per_tensor partition of a 2-hidden-layer MLP
    for m in mods["modules"]:
        assert m["sigma2"] is not None and m["sigma2"] > 0 and m["n_params"] > 0
    assert any(m["selected"] for m in mods["modules"])
    # the selection says why: after 40 meta-steps sigma^2 has not separated by two orders of magnitude, so every
    # module is task-specific (issue 10)
    sel = mods["selection"]
    assert sel["method"] == "gap" and sel["min_gap"] == pytest.approx(math.log(100))
    logs = sorted((math.log(m["sigma2"]) for m in mods["modules"]), reverse=True)
    assert sel["gap"] == pytest.approx(max(a - b for a, b in zip(logs, logs[1:])))
    assert sel["separated"] is False and all(m["selected"] for m in mods["modules"])
    early = c.get(f"/v1/jobs/{jid}/modules", params={"step": 10}, headers=h).json()
    assert early["step"] == 10 and len(early["modules"]) == 6
    assert c.get(f"/v1/jobs/{jid}/modules", params={"step": 11}, headers=h).status_code == 404

    ck = c.get(f"/v1/jobs/{jid}/checkpoints", headers=h).json()["items"]
    assert [x["step"] for x in ck] == [20, 30, 40]  # the default retention: the latest 3
    r = c.get(f"/v1/checkpoints/{ck[-1]['id']}/file", headers=h)
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == ck[-1]["sha256"] and len(r.content) == ck[-1]["bytes"]
    tensors = st_load(r.content)
    assert "log_sigma2" in tensors and "rng" in tensors

    models = c.get("/v1/models", headers=h).json()["items"]
    assert j["model_id"] in [m["id"] for m in models]
    m = c.get(f"/v1/models/{j['model_id']}", headers=h).json()
    assert m["kind"] == "regression" and m["input_shape"] == [1] and m["output_dim"] == 1
    assert m["selected_modules"] and 0 < m["selected_share"] <= 1
    assert m["selection"]["separated"] is False and m["selected_share"] == 1.0
    assert m["config"]["algorithm"]["name"] == "sigma_reptile"

    # adaptation beats the unadapted meta-model on a held-out sinusoid
    rng = np.random.default_rng(123)
    errs_adapted, errs_phi = [], []
    for amp, phase in ((3.0, 1.0), (4.5, 2.5), (1.5, 0.3)):
        xs = rng.uniform(-5, 5, 10)
        xq = np.linspace(-5, 5, 50)
        body = {"support": {"x": [[v] for v in xs], "y": [[v] for v in _sinusoid(amp, phase, xs)]},
                "query": {"x": [[v] for v in xq]}, "steps": 100}
        yq = np.array(_sinusoid(amp, phase, xq))
        a = c.post(f"/v1/models/{j['model_id']}/adapt", json=body, headers=h)
        assert a.status_code == 200, a.text
        a = a.json()
        assert len(a["predictions"]) == 50 and len(a["loss_curve"]) == 101
        assert sorted(a["adapted_modules"]) == sorted(m["selected_modules"])
        z = c.post(f"/v1/models/{j['model_id']}/adapt", json={**body, "steps": 0}, headers=h).json()
        assert len(z["loss_curve"]) == 1
        assert a["loss_curve"][-1] < 0.5 * a["loss_curve"][0]  # the support set is fitted
        errs_adapted.append(np.mean((np.array(a["predictions"])[:, 0] - yq) ** 2))
        errs_phi.append(np.mean((np.array(z["predictions"])[:, 0] - yq) ** 2))
    # after 40 meta-steps sigma^2 has not separated, every module adapts under a weak prior, and 100 steps on 10
    # points can overfit one task (the 4.5-amplitude one does); held-out error still falls on the others
    assert sum(e < p for e, p in zip(errs_adapted, errs_phi)) >= 2, (errs_adapted, errs_phi)

    allm = c.post(f"/v1/models/{j['model_id']}/adapt", headers=h, json={
        "support": {"x": [[0.0], [1.0]], "y": [[0.0], [1.0]]}, "query": {"x": [[0.5]]}, "steps": 3,
        "modules": "all"}).json()
    assert len(allm["adapted_modules"]) == 6


def test_openapi_is_the_contract_and_docs_need_no_cdn(service):
    import re
    c = service.client
    doc = c.get("/openapi.json").json()
    text = json.dumps(doc)
    refs = set(re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', text))
    assert refs and not refs - set(doc["components"]["schemas"]), refs - set(doc["components"]["schemas"])
    for path, method in (("/v1/jobs", "post"), ("/v1/models/{model_id}/adapt", "post"),
                         ("/v1/adapters/{adapter_id}/predict", "post"), ("/v1/models/{model_id}/evaluations", "post")):
        op = doc["paths"][path][method]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"], path
        assert {"401", "413", "422"} <= set(op["responses"]), (path, op["responses"].keys())
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for code, r in op["responses"].items():
                if code.startswith(("4", "5")) and (path, code) != ("/readyz", "503"):  # readiness's own JSON
                    assert list(r["content"]) == ["application/problem+json"], (path, method, code)
            if path.startswith("/v1/"):
                assert "401" in op["responses"], (path, method)
    assert {"429", "503", "504"} <= set(doc["paths"]["/v1/models/{model_id}/adapt"]["post"]["responses"])
    # the documentation pages load their scripts and styles from this server, never from a CDN
    for page in ("/docs", "/redoc"):
        html = c.get(page).text
        urls = re.findall(r'(?:src|href)\s*[=:]\s*["\']([^"\']+\.(?:js|css))["\']', html)
        assert urls, page
        for u in urls:
            assert u.startswith("/"), (page, u)
            r = c.get(u)
            assert r.status_code == 200 and len(r.content) > 10_000, (page, u)


def test_health_and_docs(service):
    c = service.client
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["checks"] == {"database": "ok", "broker": "ok", "workers": "ok"}
    assert c.get("/docs").status_code == 200
    assert "/v1/models/{model_id}/adapt" in c.get("/openapi.json").json()["paths"]


def test_idempotency_key(service):
    c, h = service.client, service.h("carol")
    cfg = small_config(steps=100000)
    a = c.post("/v1/jobs", json=cfg, headers={**h, "Idempotency-Key": "abc"}).json()
    b = c.post("/v1/jobs", json=cfg, headers={**h, "Idempotency-Key": "abc"}).json()
    assert a["id"] == b["id"]
    c.post(f"/v1/jobs/{a['id']}/cancel", headers=h)
    assert service.wait(a["id"], tenant="carol")["status"] == "canceled"


# --------------------------------------------------------------------------- cancel
def test_cancel_running_and_queued(service, reference):
    c, h = service.client, service.h()
    long_id = service.submit(small_config(steps=100000))
    queued_id = service.submit(small_config(steps=100000, seed=1))
    service.wait(long_id, pred=lambda j: j["status"] == "running" and j["progress"]["step"] >= 5)
    r = c.post(f"/v1/jobs/{queued_id}/cancel", headers=h)
    assert r.status_code == 202 and r.json()["status"] == "canceled"
    r = c.post(f"/v1/jobs/{long_id}/cancel", headers=h)
    assert r.status_code == 202 and r.json()["cancel_requested"]
    j = service.wait(long_id, timeout=120)
    assert j["status"] == "canceled" and j["model_id"] is None
    assert j["progress"]["step"] < 100000
    assert service.job(queued_id)["progress"]["step"] == 0


# --------------------------------------------------------------------------- pagination
def test_pagination(service):
    c, h = service.client, service.h("carol")
    ids = []
    for i in range(5):
        r = c.post("/v1/jobs", json=small_config(steps=100000, seed=100 + i), headers=h)
        ids.append(r.json()["id"])
        c.post(f"/v1/jobs/{ids[-1]}/cancel", headers=h)
    for i in ids:
        service.wait(i, tenant="carol")
    seen, cursor = [], None
    while True:
        params = {"limit": 2, "status": "canceled"}
        if cursor:
            params["cursor"] = cursor
        page = c.get("/v1/jobs", params=params, headers=h).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen))
    assert set(ids) <= set(seen)
    assert [x for x in seen if x in ids] == list(reversed(ids))  # newest first
    assert c.get("/v1/jobs", params={"status": "succeeded"}, headers=h).json()["items"] == []
    assert c.get("/v1/jobs", params={"cursor": "garbage"}, headers=h).status_code == 422
    assert c.get("/v1/jobs", params={"limit": 0}, headers=h).status_code == 422


# --------------------------------------------------------------------------- auth
def test_auth_401_and_404_across_tenants(service, reference):
    c = service.client
    jid, j = reference
    mid = j["model_id"]
    for hdr in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"}):
        r = c.get("/v1/jobs", headers=hdr)
        assert r.status_code == 401 and r.json()["status"] == 401 and "detail" in r.json()
    assert c.post("/v1/jobs", json=small_config()).status_code == 401
    bob = service.h("bob")
    ck = c.get(f"/v1/jobs/{jid}/checkpoints", headers=service.h()).json()["items"][0]["id"]
    for method, path in (("GET", f"/v1/jobs/{jid}"), ("POST", f"/v1/jobs/{jid}/cancel"),
                         ("GET", f"/v1/jobs/{jid}/metrics"), ("GET", f"/v1/jobs/{jid}/modules"),
                         ("GET", f"/v1/jobs/{jid}/checkpoints"), ("GET", f"/v1/checkpoints/{ck}/file"),
                         ("GET", f"/v1/models/{mid}"), ("GET", f"/v1/models/{mid}/file")):
        r = c.request(method, path, headers=bob)
        assert r.status_code == 404, (path, r.text)
        assert r.json()["status"] == 404
    r = c.post(f"/v1/models/{mid}/adapt", headers=bob, json={
        "support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.0]]}})
    assert r.status_code == 404
    assert mid not in [m["id"] for m in c.get("/v1/models", headers=bob).json()["items"]]
    assert jid not in [x["id"] for x in c.get("/v1/jobs", headers=bob).json()["items"]]


# --------------------------------------------------------------------------- 422
@pytest.mark.parametrize("mutate,loc", [
    (lambda c: c.update(bogus=1), ["bogus"]),
    (lambda c: c["outer"].update(steps=0), ["outer", "steps"]),
    (lambda c: c["inner"].update(lr=-1.0), ["inner", "lr"]),
    (lambda c: c.pop("algorithm"), ["algorithm"]),
    (lambda c: c["algorithm"].update(name="nope"), ["algorithm"]),
    (lambda c: c["model"].update(depth=3), ["model", "mlp", "depth"]),
    (lambda c: c["tasks"].update(amplitude=[5.0, 1.0]), ["tasks", "sinusoid"]),
])
def test_job_config_422(service, mutate, loc):
    cfg = small_config()
    mutate(cfg)
    r = service.client.post("/v1/jobs", json=cfg, headers=service.h())
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["status"] == 422 and body["detail"]
    assert any(e["loc"][:len(loc)] == loc for e in body["errors"]), body["errors"]


def test_job_body_not_json_422(service):
    h = {**service.h(), "Content-Type": "application/json"}
    r = service.client.post("/v1/jobs", content=b"{not json", headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body"]
    r = service.client.post("/v1/jobs", content=b"[1, 2]", headers=h)
    assert r.status_code == 422


GOOD = {"support": {"x": [[0.0], [1.0], [2.0]], "y": [[0.0], [0.8], [0.9]]}, "query": {"x": [[0.5]]}, "steps": 5}


@pytest.mark.parametrize("raw,loc,needle", [
    ('{"support": {"x": [[NaN], [1.0]], "y": [[0.0], [1.0]]}, "query": {"x": [[0.5]]}}', ["support", "x"], "NaN"),
    ('{"support": {"x": [[0.0], [1.0]], "y": [[Infinity], [1.0]]}, "query": {"x": [[0.5]]}}', ["support", "y"], "Inf"),
    ('{"support": {"x": [[0.0], [1.0]], "y": [[0.0], [1.0]]}, "query": {"x": [[-Infinity]]}}', ["query", "x"], "Inf"),
    ('{"support": {"x": [[0.0], [1.0, 2.0]], "y": [[0.0], [1.0]]}, "query": {"x": [[0.5]]}}', ["support", "x"], "ragged"),
    ('{"support": {"x": [[0.0, 1.0], [1.0, 2.0]], "y": [[0.0], [1.0]]}, "query": {"x": [[0.5]]}}', ["support", "x"], "shape"),
    ('{"support": {"x": [[0.0], [1.0]], "y": [[0.0, 1.0], [1.0, 2.0]]}, "query": {"x": [[0.5]]}}', ["support", "y"], "shape"),
    ('{"support": {"x": [[0.0], [1.0]], "y": [[0.0]]}, "query": {"x": [[0.5]]}}', ["support", "y"], "rows"),
    ('{"support": {"x": [[0.0], [1.0]], "y": [[0.0], [1.0]]}, "query": {"x": [[0.5, 1.0]]}}', ["query", "x"], "shape"),
    ('{"support": {"x": [["a"], [1.0]], "y": [[0.0], [1.0]]}, "query": {"x": [[0.5]]}}', ["support", "x"], "number"),
    ('{"support": {"x": [], "y": []}, "query": {"x": [[0.5]]}}', ["support", "x"], "row"),
    ('{"support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.5]]}, "steps": 2001}', ["steps"], "cap"),
    ('{"support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.5]]}, "steps": -1}', ["steps"], ""),
    ('{"support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.5]]}, "modules": ["nope"]}', ["modules"], "unknown"),
    ('{"support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.5]]}, "extra": 1}', ["extra"], ""),
    ('{"support": {"x": [[0.0]], "y": [[0.0]]}}', ["query"], ""),
    ('{"support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.5]]}', ["body"], "JSON"),
])
def test_adapt_422(service, reference, raw, loc, needle):
    mid = reference[1]["model_id"]
    r = service.client.post(f"/v1/models/{mid}/adapt", content=raw.encode(),
                            headers={**service.h(), "Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert any(e["loc"][:len(loc)] == loc for e in body["errors"]), body
    assert needle.lower() in body["detail"].lower(), body["detail"]


def test_adapt_caps_422(service, reference):
    mid, h = reference[1]["model_id"], service.h()
    rows = [[0.0]] * 501
    r = service.client.post(f"/v1/models/{mid}/adapt", headers=h, json={
        "support": {"x": rows, "y": rows}, "query": {"x": [[0.0]]}})
    assert r.status_code == 422 and "cap" in r.json()["detail"] and r.json()["errors"][0]["loc"] == ["support", "x"]
    r = service.client.post(f"/v1/models/{mid}/adapt", headers=h, json={
        "support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.0]] * 501}})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", "x"]
    big = [[0.123456789012345]] * 20000  # ~ 400 kB > the 200 kB cap of the test settings
    r = service.client.post(f"/v1/models/{mid}/adapt", headers=h, json={
        "support": {"x": big, "y": big}, "query": {"x": [[0.0]]}})
    assert r.status_code == 413 and "bytes" in r.json()["detail"] and r.json()["errors"][0]["loc"] == ["body"]


def test_bodies_capped_and_nesting_refused(service, reference):
    """Every JSON body has a byte cap (413 before it is read) and deep nesting is a 422, never a 500."""
    c, h, mid = service.client, service.h(), reference[1]["model_id"]
    r = c.post("/v1/jobs", headers={**h, "Content-Type": "application/json"},
               content=b'{"x": "' + b"a" * (service.app.state.settings.job_max_bytes + 1) + b'"}')
    assert r.status_code == 413 and r.json()["errors"][0]["loc"] == ["body"], r.text
    deep = b"[" * 30_000 + b"]" * 30_000  # under every cap, far deeper than any schema
    for url in ("/v1/jobs", f"/v1/models/{mid}/adapt", f"/v1/models/{mid}/evaluations"):
        body = b'{"support": {"x": ' + deep + b"}}" if url.endswith("adapt") else deep
        r = c.post(url, headers={**h, "Content-Type": "application/json"}, content=body)
        assert r.status_code == 422, (url, r.status_code, r.text[:200])


def test_adapt_never_answers_200_with_non_finite_numbers(service, reference):
    mid, h = reference[1]["model_id"], service.h()
    url = f"/v1/models/{mid}/adapt"
    x = [[-4.0], [-2.0], [0.0], [2.0], [4.0]]
    # targets so large that the adaptation overflows: it stops at the last finite step and says so
    r = service.client.post(url, headers=h, json={"support": {"x": x, "y": [[1e12 * v[0]] for v in x]},
                                                  "query": {"x": [[0.5]]}, "steps": 100, "modules": "all"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["diverged_at_step"] is not None and len(out["loss_curve"]) == out["diverged_at_step"], out
    assert all(math.isfinite(v) for v in out["loss_curve"] + out["predictions"][0])
    # inputs whose magnitude makes the model overflow before any step, or at prediction: 422
    for body in ({"support": {"x": [[1e30]], "y": [[0.0]]}, "query": {"x": [[0.5]]}},
                 {"support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[1e300]]}, "steps": 1}):
        r = service.client.post(url, headers=h, json=body)
        assert r.status_code == 422 and "overflow" in r.json()["detail"], r.text


def test_adapt_tenant_limit_429_and_deadline_504(service, reference):
    mid, h = reference[1]["model_id"], service.h()
    url = f"/v1/models/{mid}/adapt"
    r = service.app.state.redis
    slot = "metashrink:adapt-inflight:alice"
    r.set(slot, service.app.state.settings.adapt_tenant_concurrency)  # alice's slots are all taken
    try:
        res = service.client.post(url, headers=h, json=GOOD)
        assert res.status_code == 429 and res.headers["Retry-After"] and "in flight" in res.json()["detail"]
    finally:
        r.delete(slot)
    assert service.client.post(url, headers=h, json=GOOD).status_code == 200
    # no adapt worker: the request's deadline passes, 504 with a problem body, and its message expires with it
    for name in service.worker_names("adapt"):
        service.kill_worker(name)
    ready = service.client.get("/readyz")
    assert ready.status_code == 503 and ready.json()["checks"]["workers"] == "error: no worker consumes adapt"
    settings = service.app.state.settings
    old, settings.adapt_timeout = settings.adapt_timeout, 2.0
    try:
        t0 = time.monotonic()
        res = service.client.post(url, headers=h, json=GOOD)
        assert res.status_code == 504 and res.headers["content-type"].startswith("application/problem+json")
        assert 1.5 < time.monotonic() - t0 < 10
    finally:
        settings.adapt_timeout = old
        service.start_worker("adapt")
    assert int(r.get(slot) or 0) == 0  # every slot given back
    assert service.client.post(url, headers=h, json=GOOD).status_code == 200


def test_one_tenant_flooding_adapt_does_not_starve_another(service, reference):
    """alice sends 10 heavy adapts at once (the test caps: 2,000 steps on 500 rows); at most
    adapt_tenant_concurrency of them run, the rest get 429 at once; carol's small adapt of her own model, sent
    into the flood, runs on the light lane (the heavy ones are above METASHRINK_ADAPT_HEAVY_FLOPS): it answers
    200 before any of alice's admitted heavy adapts has finished."""
    from concurrent.futures import ThreadPoolExecutor
    url = f"/v1/models/{reference[1]['model_id']}/adapt"
    j = service.wait(service.submit(small_config(steps=5), tenant="carol"), tenant="carol")
    assert j["status"] == "succeeded", j
    carol_url = f"/v1/models/{j['model_id']}/adapt"
    rows = [[float(i % 50) / 10] for i in range(500)]
    heavy = {"support": {"x": rows, "y": rows}, "query": {"x": [[0.5]]}, "steps": 2000, "modules": "all"}
    limit = service.app.state.settings.adapt_tenant_concurrency
    done_at = {}

    def post(i):
        r = service.client.post(url, headers=service.h(), json=heavy)
        done_at[i] = time.monotonic()
        return r

    with ThreadPoolExecutor(11) as pool:
        flood = [pool.submit(post, i) for i in range(10)]
        time.sleep(0.5)
        small = service.client.post(carol_url, headers=service.h("carol"), json=GOOD)
        small_at = time.monotonic()
        codes = sorted(f.result().status_code for f in flood)
    assert small.status_code == 200, small.text
    finished = [done_at[i] for i, f in enumerate(flood) if f.result().status_code == 200]
    assert finished and small_at < min(finished), (small_at, finished)
    assert codes.count(429) >= 10 - limit and set(codes) <= {200, 429}, codes
    assert all(f.result().headers.get("Retry-After") for f in flood if f.result().status_code == 429)


def test_an_adapt_past_its_deadline_is_cut_and_frees_the_worker(service, reference):
    """A heavy adapt (10,000 steps, the default cap, on 500 rows) with a deadline a quarter of its run time
    gets 504, and the worker cuts it there: a small adapt sent right after answers 200 long before the heavy
    one would have finished (with one adapt worker process it would otherwise wait behind it)."""
    from core.adapt import MAX_ADAPT_STEPS
    url, h = f"/v1/models/{reference[1]['model_id']}/adapt", service.h()
    assert len(service.worker_names("adapt_heavy")) == 1
    rows = [[float(i % 50) / 10] for i in range(500)]
    heavy = {"support": {"x": rows, "y": rows}, "query": {"x": [[0.5]]}, "steps": MAX_ADAPT_STEPS,
             "modules": "all"}
    assert service.client.post(url, headers=h, json=GOOD).status_code == 200  # the model is loaded: the
    settings = service.app.state.settings                                      # timings are adaptation only
    caps = settings.adapt_max_steps, settings.adapt_timeout
    settings.adapt_max_steps = MAX_ADAPT_STEPS
    heavy_flops, settings.adapt_heavy_flops = settings.adapt_heavy_flops, 0.0  # every request on the heavy lane's
    try:                                                                        # one worker process
        t0 = time.monotonic()
        assert service.client.post(url, headers=h, json=heavy).status_code == 200
        full = time.monotonic() - t0  # the heavy adapt's run time when nothing cuts it
        settings.adapt_timeout = full / 4
        t0 = time.monotonic()
        cut = service.client.post(url, headers=h, json=heavy)
        settings.adapt_max_steps, settings.adapt_timeout = caps
        small = service.client.post(url, headers=h, json=GOOD)
        waited = time.monotonic() - t0  # from sending the heavy adapt to the small one's answer
    finally:
        settings.adapt_max_steps, settings.adapt_timeout = caps
        settings.adapt_heavy_flops = heavy_flops
    assert cut.status_code == 504 and small.status_code == 200, (cut.text, small.text)
    assert waited < 0.75 * full, (waited, full)  # uncut, the small adapt would answer after >= full
    assert "cut at its deadline" in (service.logdir / "worker-adapt_heavy.log").read_text()
    print(f"heavy adapt {full:.2f} s; deadline {full / 4:.2f} s; 504 + small adapt answered after {waited:.2f} s")


# --------------------------------------------------------------------------- resume
def _chaos_config():
    # a heartbeat every step, so that a kill lands at the step the test chose, between checkpoints (every 5);
    # 200 steps, so that the last kill (step <= 119) lands well before the end: with 130 the resumed job once ran
    # its last 11 steps between two 0.2 s polls and ended before the 20th kill
    return small_config(steps=200, outer={"meta_batch": 50, "steps": 200, "lr_phi": 0.003, "lr_log_sigma2": 0.01},
                        run={"checkpoint_every": 5, "module_map_every": 10, "log_every": 1})


@pytest.fixture(scope="module")
def chaos_reference(service):
    jid = service.submit(_chaos_config())
    j = service.wait(jid, timeout=600)
    assert j["status"] == "succeeded", j
    return j


def _kill_train_workers(service):
    for name in service.worker_names("train"):
        service.kill_worker(name)
    service.start_worker("train")


def _same_model(service, a_id, b_id):
    a, b = _model_tensors(service, a_id), _model_tensors(service, b_id)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_resume_after_20_random_sigkills(service, chaos_reference):
    """SIGKILL the train worker (parent and prefork child) at 20 random steps of one job (seeded; at least 4
    steps apart, so a checkpoint usually lies between two kills): seven times max_attempts (3), but the attempts
    that made progress do not count. Every resume continues from the latest checkpoint; the job succeeds once,
    its metrics are contiguous and its final parameters equal the uninterrupted run's, bit for bit."""
    import random
    rng = random.Random(11)
    points = [6 * i + 3 + rng.randrange(3) for i in range(20)]  # 3..119 of 200 steps
    jid = service.submit(_chaos_config())
    kills = 0
    for at in points:
        j = service.wait(jid, pred=lambda j, at=at: j["status"] != "queued" and (
            j["status"] != "running" or j["progress"]["step"] >= at), timeout=300)
        if j["status"] != "running":
            break
        _kill_train_workers(service)
        kills += 1
    j = service.wait(jid, timeout=600)
    assert kills == 20, f"the job ended after {kills} kills; the test did not exercise resume"
    assert j["status"] == "succeeded", j
    assert j["attempts"] <= 2, j  # consecutive claims since the last checkpoint
    _same_model(service, j["model_id"], chaos_reference["model_id"])
    series = service.client.get(f"/v1/jobs/{jid}/metrics", headers=service.h()).json()["series"]
    assert [s for s, _ in series["query_loss"]] == list(range(1, 201))


def test_retry_resumes_a_canceled_job(service, chaos_reference):
    c, h = service.client, service.h()
    jid = service.submit(_chaos_config())
    service.wait(jid, pred=lambda j: j["status"] == "running" and j["progress"]["step"] >= 30, timeout=300)
    assert c.post(f"/v1/jobs/{jid}/retry", headers=h).status_code == 409  # running: nothing to retry
    c.post(f"/v1/jobs/{jid}/cancel", headers=h)
    j = service.wait(jid, timeout=120)
    assert j["status"] == "canceled", j
    r = c.post(f"/v1/jobs/{jid}/retry", headers=h)
    assert r.status_code == 202 and r.json()["status"] in ("queued", "running") and r.json()["error"] is None, r.text
    j = service.wait(jid, timeout=600)
    assert j["status"] == "succeeded", j
    _same_model(service, j["model_id"], chaos_reference["model_id"])
    assert c.post(f"/v1/jobs/{jid}/retry", headers=service.h("bob")).status_code == 404


# --------------------------------------------------------------------------- reconciler
def _insert_job(service, **fields):
    from datetime import timedelta

    from schemas import JobConfig
    from store.models import Job, new_id, utcnow
    cfg = JobConfig.model_validate(small_config(steps=10)).model_dump(mode="json")
    now = utcnow()
    row = dict(id=new_id("job"), tenant="alice", kind="train", status="queued", config=cfg, step=0, total_steps=10,
               attempts=0, max_attempts=3, cancel_requested=False, created_at=now, updated_at=now,
               enqueued_at=now - timedelta(seconds=600))
    row.update(fields)
    with service.app.state.db.session() as s:
        s.add(Job(**row))
    return row["id"]


def test_reconciler_resends_lost_message(service):
    """A queued job whose broker message was lost (never sent here) is found from the database and runs."""
    jid = _insert_job(service)
    j = service.wait(jid, timeout=300)
    assert j["status"] == "succeeded" and j["attempts"] == 1, j


def test_reconciler_fails_job_with_attempts_spent(service):
    from datetime import timedelta

    from store.models import utcnow
    jid = _insert_job(service, status="running", attempts=3, lease_owner="gone:1:x",
                      lease_expires_at=utcnow() - timedelta(seconds=5))
    j = service.wait(jid, timeout=60)
    assert j["status"] == "failed" and "attempts" in j["error"]["message"], j


# --------------------------------------------------------------------------- adapters
def test_adapter_saved_and_predicts_like_adapt(service, reference):
    c, h = service.client, service.h()
    mid = reference[1]["model_id"]
    xs = np.linspace(-4, 4, 10)
    xq = [[v] for v in np.linspace(-5, 5, 20)]
    body = {"support": {"x": [[v] for v in xs], "y": [[v] for v in _sinusoid(2.0, 0.5, xs)]},
            "query": {"x": xq}, "steps": 20, "save_adapter": True}
    a = c.post(f"/v1/models/{mid}/adapt", json=body, headers=h)
    assert a.status_code == 200, a.text
    a = a.json()
    aid = a["adapter_id"]
    assert aid and c.post(f"/v1/models/{mid}/adapt", json={**body, "save_adapter": False},
                          headers=h).json().get("adapter_id") is None
    info = c.get(f"/v1/adapters/{aid}", headers=h).json()
    assert info["model_id"] == mid and sorted(info["modules"]) == sorted(a["adapted_modules"])
    assert info["bytes"] > 0 and len(info["sha256"]) == 64
    m = c.get(f"/v1/models/{mid}", headers=h).json()
    sel_params = sum(x["n_params"] for x in m["module_map"] if x["selected"])
    assert info["bytes"] < m["bytes"] or sel_params == sum(x["n_params"] for x in m["module_map"])
    p = c.post(f"/v1/adapters/{aid}/predict", json={"x": xq}, headers=h)
    assert p.status_code == 200, p.text
    np.testing.assert_allclose(np.array(p.json()["predictions"]), np.array(a["predictions"]), rtol=1e-6, atol=1e-6)
    # tenant-scoped; bad inputs are 422
    bob = service.h("bob")
    assert c.get(f"/v1/adapters/{aid}", headers=bob).status_code == 404
    assert c.post(f"/v1/adapters/{aid}/predict", json={"x": xq}, headers=bob).status_code == 404
    r = c.post(f"/v1/adapters/{aid}/predict", json={"x": [[1.0, 2.0]]}, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["x"]
    assert c.post(f"/v1/adapters/{aid}/predict", json={"y": 1}, headers=h).status_code == 422


def test_prometheus_metrics(service, reference):
    mid, c, h = reference[1]["model_id"], service.client, service.h()
    c.post(f"/v1/models/{mid}/adapt", headers=h, json={
        "support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.5]]}, "steps": 1})
    r, slot = service.app.state.redis, "metashrink:adapt-inflight:alice"
    r.set(slot, 100)  # a 429
    try:
        assert c.post(f"/v1/models/{mid}/adapt", headers=h, json=GOOD).status_code == 429
    finally:
        r.delete(slot)
    res = c.get("/metrics")
    assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
    samples = {}
    for ln in res.text.splitlines():
        if ln and not ln.startswith("#"):
            name, value = ln.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['metashrink_jobs{status="succeeded"}'] >= 1 and 'metashrink_evaluations{status="queued"}' in samples
    assert samples['metashrink_adapt_latency_seconds_count{route="adapt"}'] >= 1
    assert 'metashrink_adapt_latency_seconds_bucket{le="+Inf",route="adapt"}' in samples
    assert samples['metashrink_adapt_rejected_total{route="adapt",status="429"}'] >= 1
    assert samples['metashrink_workers{queue="train"}'] >= 1 and samples['metashrink_workers{queue="adapt"}'] >= 1
    assert samples['metashrink_queue_depth{queue="train"}'] >= 0
