"""Resource control with real processes (issue 21): admission by estimated cost, a running step stopped within
seconds by cancel and DELETE, concurrent DELETEs that hold no server thread, a training process held to its
memory limit, and checkpoint retention."""
from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from .conftest import small_config
from .test_lifecycle import second_api  # noqa: F401  (fixture: a uvicorn API process)

# the config: accepted before, then ~14 GB RSS at step 0 and impossible to stop
HUGE = {"algorithm": {"name": "sigma_maml"}, "model": {"arch": "identity"},
        "tasks": {"family": "hierarchical_normal", "shots": 100000, "query": 100000},
        "outer": {"meta_batch": 4096, "steps": 10}}
# one meta-step of several minutes on a small footprint (10,000 inner steps over 50 tasks)
LONG_STEP = {"algorithm": {"name": "reptile"}, "model": {"arch": "mlp", "hidden": [64, 64]},
             "tasks": {"family": "sinusoid", "shots": 50, "query": 10}, "inner": {"steps": 10000},
             "outer": {"meta_batch": 50, "steps": 5}, "execution": {"compile": False}}


def test_oversized_configs_are_refused_naming_their_estimate(service):
    c, h = service.client, service.h()
    r = c.post("/v1/jobs", json=HUGE, headers=h)
    assert r.status_code == 422, r.text
    body = r.json()
    assert "estimated memory per meta-step" in body["detail"] and "METASHRINK_JOB_MAX_MEMORY_BYTES" in body["detail"]
    assert "outer.meta_batch=4096" in body["detail"] and "tasks.shots=100000" in body["detail"]
    err = body["errors"][0]
    assert err["loc"] == ["outer", "meta_batch"] and err["estimate"]["memory_bytes"] > 14 * 1024 ** 3
    # 16 x 4096 hidden units: 252M parameters
    big = {**small_config(), "model": {"arch": "mlp", "hidden": [4096] * 16}}
    r = c.post("/v1/jobs", json=big, headers=h)
    assert r.status_code == 422 and "estimated memory" in r.json()["detail"], r.text
    # compute: 10^7 meta-steps of 20-way conv4 MAML
    long = {"algorithm": {"name": "maml"}, "model": {"arch": "conv4"},
            "tasks": {"family": "image_classes", "ways": 20, "shots": 1, "query": 5},
            "outer": {"steps": 10_000_000, "meta_batch": 32}}
    r = c.post("/v1/jobs", json=long, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["outer", "steps"], r.text
    assert "estimated compute" in r.json()["detail"]
    # 1,000 checkpoints kept of a 2 x 4096 MLP (268 MB each)
    keep_all = {**small_config(steps=10_000), "model": {"arch": "mlp", "hidden": [4096, 4096]},
                "run": {"checkpoint_every": 1, "keep_checkpoints": 1000}}
    r = c.post("/v1/jobs", json=keep_all, headers=h)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["run", "keep_checkpoints"], r.text
    assert c.get("/v1/jobs", headers=h).status_code == 200  # nothing was queued by the refusals


def _running(service, jid, tenant="alice"):
    service.wait(jid, pred=lambda j: j["status"] == "running" and j["startup"] is not None, timeout=120,
                 tenant=tenant)
    time.sleep(3)  # well inside its first meta-step


def test_cancel_and_delete_stop_a_running_step_within_seconds(service):
    c, h = service.client, service.h()
    jid = service.submit(LONG_STEP)
    _running(service, jid)
    assert service.job(jid)["progress"]["step"] == 0
    t0 = time.monotonic()
    assert c.post(f"/v1/jobs/{jid}/cancel", headers=h).status_code == 202
    j = service.wait(jid, timeout=30)
    took = time.monotonic() - t0
    assert j["status"] == "canceled" and j["progress"]["step"] == 0, j
    assert took < 10, took

    jid = service.submit(LONG_STEP)
    _running(service, jid)
    t0 = time.monotonic()
    r = c.delete(f"/v1/jobs/{jid}", headers=h)
    assert r.status_code == 204, r.text
    assert time.monotonic() - t0 < 10
    # the worker is free again: a small job runs to the end
    assert service.wait(service.submit(small_config(steps=5)))["status"] == "succeeded"


def test_concurrent_deletes_of_a_running_job_hold_no_server_thread(service, second_api):  # noqa: F811
    h = service.h()
    jid = service.submit(LONG_STEP)
    _running(service, jid)
    health: list = []
    with httpx.Client(base_url=second_api, timeout=60) as cl, ThreadPoolExecutor(50) as pool:
        deletes = [pool.submit(cl.delete, f"/v1/jobs/{jid}", headers=h) for _ in range(45)]
        end = time.monotonic() + 4  # /healthz probed while the DELETEs arrive, wait for the worker and finish
        while time.monotonic() < end or not all(f.done() for f in deletes):
            t0 = time.monotonic()
            assert cl.get("/healthz").status_code == 200
            health.append(time.monotonic() - t0)
            time.sleep(0.05)
        codes = [f.result().status_code for f in deletes]
    assert 500 not in codes and codes.count(204) == 1, codes
    assert set(codes) <= {204, 404, 409}, codes
    p95 = sorted(health)[int(0.95 * len(health))]
    assert len(health) >= 20 and p95 < 0.1, (p95, sorted(health)[-5:])


def test_a_job_over_its_memory_limit_fails_and_the_worker_goes_on(service, reference):
    # the API admits the job (its estimate, 2.8 GiB, is under the API's limit); the train worker is restarted with
    # a 1 GiB limit, which the step's real growth (~2.5 GB measured) crosses
    heavy = {"algorithm": {"name": "maml"}, "model": {"arch": "mlp", "hidden": [512, 512]},
             "tasks": {"family": "sinusoid", "shots": 200, "query": 200}, "inner": {"steps": 10},
             "outer": {"meta_batch": 25, "steps": 5}, "execution": {"compile": False}}
    env = service.env
    for name in service.worker_names("train"):
        service.kill_worker(name)
    service.env = {**env, "METASHRINK_JOB_MAX_MEMORY_BYTES": str(1024 ** 3)}
    try:
        service.start_worker("train")
        service.env = env
        jid = service.submit(heavy)
        service.wait(jid, pred=lambda j: j["status"] != "queued", timeout=120)
        small = {"support": {"x": [[0.0], [1.0]], "y": [[0.0], [1.0]]}, "query": {"x": [[0.5]]}, "steps": 5}
        r = service.client.post(f"/v1/models/{reference[1]['model_id']}/adapt", json=small, headers=service.h())
        assert r.status_code == 200, r.text  # adapts are served meanwhile (their own worker processes)
        j = service.wait(jid, timeout=180)
        assert j["status"] == "failed", j
        msg = j["error"]["message"]
        assert "METASHRINK_JOB_MAX_MEMORY_BYTES" in msg and "memory grew by" in msg and "limit of 1.00 GiB" in msg, msg
        # another tenant's job runs on the same worker process afterwards
        other = service.wait(service.submit(small_config(steps=5), tenant="bob"), tenant="bob")
        assert other["status"] == "succeeded", other
    finally:
        service.env = env
        for name in service.worker_names("train"):
            service.kill_worker(name)
        service.start_worker("train")


def test_retention_keeps_the_latest_and_the_best_checkpoint(service):
    c, h = service.client, service.h()
    cfg = small_config(steps=30)
    # min_delta this large: only the first validation improves, so the best stays at step 3
    cfg["run"] = {"checkpoint_every": 1, "module_map_every": 10, "log_every": 5, "validate_every": 3,
                  "validation_tasks": 5, "min_delta": 1e9, "keep_checkpoints": 2}
    j = service.wait(service.submit(cfg))
    assert j["status"] == "succeeded", j
    items = c.get(f"/v1/jobs/{j['id']}/checkpoints", headers=h).json()["items"]
    assert [(x["step"], x["best"]) for x in items] == [(3, True), (29, False), (30, False)], items
    files = sorted((service.settings.artifacts_dir / "jobs" / j["id"]).glob("ckpt-*"))
    assert len(files) == 3, files


def test_usage_counts_every_artifact_and_the_quota_refuses_more(service, reference):
    c, h = service.client, service.h()
    jid, j = reference
    u = c.get("/v1/usage", headers=h).json()
    ck = c.get(f"/v1/jobs/{jid}/checkpoints", headers=h).json()["items"]
    model = c.get(f"/v1/models/{j['model_id']}", headers=h).json()
    assert u["bytes"]["checkpoints"] >= sum(x["bytes"] for x in ck) > 0
    assert u["bytes"]["models"] >= model["bytes"] > 0
    b = u["bytes"]
    assert b["total"] == b["datasets"] + b["checkpoints"] + b["models"] + b["adapters"]
    assert u["limits"]["tenant_quota_bytes"] == service.settings.tenant_quota_bytes

    settings = service.app.state.settings  # this API process's quota, lowered to what alice stores now
    saved = settings.tenant_quota_bytes
    settings.tenant_quota_bytes = b["total"]
    try:
        r = c.post("/v1/jobs", json=small_config(steps=5), headers=h)
        assert r.status_code == 507 and "over its quota" in r.json()["detail"], r.text
        body = {"support": {"x": [[0.0], [1.0]], "y": [[0.0], [1.0]]}, "query": {"x": [[0.5]]}, "steps": 2,
                "save_adapter": True}
        r = c.post(f"/v1/models/{j['model_id']}/adapt", json=body, headers=h)
        assert r.status_code == 507 and "no room for an adapter" in r.json()["detail"], r.text
        body["save_adapter"] = False  # predictions alone store nothing
        assert c.post(f"/v1/models/{j['model_id']}/adapt", json=body, headers=h).status_code == 200
        assert c.post("/v1/jobs", json=small_config(steps=5), headers=service.h("bob")).status_code == 202
    finally:
        settings.tenant_quota_bytes = saved


def test_the_parser_process_dies_with_a_killed_api(service, reference):
    """A large JSON body is parsed in a spawned process; SIGKILL of the API process takes it along."""
    import os
    import signal
    import subprocess

    import psutil

    from .test_lifecycle import start_api
    p, url = start_api(service, subprocess.DEVNULL, METASHRINK_ADAPT_MAX_BYTES="4000000")
    try:
        n = 400  # with the padding ~420 KB: above api.bodies.OFF_PROCESS_ABOVE, so a parser process takes it
        body = {"support": {"x": [[0.123456789]] * n, "y": [[0.987654321]] * n}, "query": {"x": [[0.5]] * n},
                "steps": 1}
        raw = json.dumps(body).encode() + b" " * 400_000
        r = httpx.post(f"{url}/v1/models/{reference[1]['model_id']}/adapt", content=raw, timeout=60,
                       headers={**service.h(), "Content-Type": "application/json"})
        assert r.status_code == 200, r.text
        children = psutil.Process(p.pid).children(recursive=True)
        assert children, "no parser process was spawned"
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [c.cmdline() for c in alive]
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_chunked_body_over_the_cap_is_413(service):
    c, h = service.client, service.h()
    cap = service.settings.job_max_bytes

    def chunks():
        for _ in range(cap // 65536 + 2):
            yield b" " * 65536

    r = c.post("/v1/jobs", content=chunks(), headers={**h, "Content-Type": "application/json"})
    assert r.status_code == 413, r.text
