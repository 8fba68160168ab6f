"""Lifecycle (issue 12, item 5): API keys listed, created and revoked (admin routes, the CLI on the database), a
revoked key refused on the next request in every API process (this one and a second uvicorn process), DELETE
for every resource (files gone from the artifact store, 404 after and for another tenant, 409 naming what
depends on it, a running job canceled first) and file errors without server paths."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks.serve_harness import free_port

from .conftest import small_config
from .test_datasets import _sinusoid_csv, upload

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def cli(service, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "client.cli", *args], cwd=ROOT, env=service.env,
                          capture_output=True, text=True, timeout=timeout)


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


def new_key(service, tenant, admin=False):
    p = cli(service, "keys", "create", "--tenant", tenant, *(["--admin"] if admin else []))
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().splitlines()[-1]


def key_id(service, key):
    from store.keys import hash_key
    from store.models import ApiKey
    with service.app.state.db.session() as s:
        return s.query(ApiKey).filter_by(key_hash=hash_key(key)).one().id


@pytest.fixture(scope="module")
def admin(service):
    return new_key(service, "ops", admin=True)


def start_api(service, log, **env) -> tuple:
    """An API process (uvicorn, its own memory) on the service's database and broker: (Popen, url) once it
    answers /healthz. ``env``: METASHRINK_* settings of its own."""
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port",
                          str(port), "--log-level", "warning"], cwd=ROOT,
                         env={**service.env, "METASHRINK_RECONCILER": "0", **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return p, url
        except httpx.TransportError:
            pass
        assert p.poll() is None and time.monotonic() - t0 < 120, f"the API process did not start; {service.logdir}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def second_api(service):
    """A second API process (uvicorn, its own memory) on the same database and broker."""
    log = open(service.logdir / "api2.log", "ab")
    p, url = start_api(service, log)
    yield url
    p.terminate()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    log.close()


def artifact(service, model, id_):
    """The row's file in the artifact store."""
    with service.app.state.db.session() as s:
        return service.app.state.store.path(s.get(model, id_).uri)


def no_paths(service, text):
    for p in (str(service.logdir), str(service.settings.artifacts_dir), str(ROOT), "/tmp/", ".safetensors'"):
        assert p not in text, (p, text)


# --------------------------------------------------------------------------- keys
def test_admin_key_routes_and_403_for_other_keys(service, admin):
    c = service.client
    assert c.get("/v1/admin/keys").status_code == 401
    for method, path, body in (("GET", "/v1/admin/keys", None), ("POST", "/v1/admin/keys", {"tenant": "x"}),
                               ("DELETE", f"/v1/admin/keys/{key_id(service, admin)}", None)):
        r = c.request(method, path, json=body, headers=service.h())
        assert r.status_code == 403, r.text
        assert r.headers["content-type"] == "application/problem+json" and r.json()["status"] == 403
    r = c.get("/v1/admin/keys", headers=bearer(admin))
    assert r.status_code == 200, r.text
    items = r.json()["items"]
    assert {"alice", "bob", "carol", "ops"} <= {k["tenant"] for k in items}
    assert "hash" not in r.text and service.keys["alice"] not in r.text
    for k in items:
        assert set(k) == {"id", "tenant", "prefix", "admin", "created_at", "revoked_at", "revoked"}, k
    assert [k["admin"] for k in items if k["tenant"] == "ops"] == [True]
    assert c.get("/v1/admin/keys", params={"limit": 2}, headers=bearer(admin)).json()["next_cursor"]

    r = c.post("/v1/admin/keys", json={"tenant": "dave"}, headers=bearer(admin))
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["key"].startswith(made["prefix"]) and made["tenant"] == "dave" and not made["admin"]
    assert c.get("/v1/jobs", headers=bearer(made["key"])).status_code == 200
    listed = c.get("/v1/admin/keys", params={"tenant": "dave"}, headers=bearer(admin)).json()["items"]
    assert [k["id"] for k in listed] == [made["id"]] and "key" not in listed[0]
    assert c.get("/v1/admin/keys", headers=bearer(made["key"])).status_code == 403  # not an admin key

    assert c.delete(f"/v1/admin/keys/{made['id']}", headers=bearer(admin)).status_code == 204
    r = c.get("/v1/jobs", headers=bearer(made["key"]))  # the very next request
    assert r.status_code == 401 and r.json()["status"] == 401, r.text
    listed = c.get("/v1/admin/keys", params={"tenant": "dave"}, headers=bearer(admin)).json()["items"]
    assert listed[0]["revoked"] and listed[0]["revoked_at"]
    assert c.delete(f"/v1/admin/keys/{made['id']}", headers=bearer(admin)).status_code == 204  # idempotent
    assert c.get("/v1/admin/keys", params={"tenant": "dave"},
                 headers=bearer(admin)).json()["items"][0]["revoked_at"] == listed[0]["revoked_at"]
    assert c.delete("/v1/admin/keys/key_nope", headers=bearer(admin)).status_code == 404
    for bad in ({"tenant": "../etc"}, {"tenant": ""}, {"tenant": "x", "extra": 1}, {}):
        r = c.post("/v1/admin/keys", json=bad, headers=bearer(admin))
        assert r.status_code == 422, (bad, r.text)
    second = c.post("/v1/admin/keys", json={"tenant": "ops2", "admin": True}, headers=bearer(admin)).json()
    assert second["admin"] and c.get("/v1/admin/keys", headers=bearer(second["key"])).status_code == 200


def test_cli_keys_list_and_revoke(service, admin):
    c = service.client
    key = new_key(service, "erin")
    assert c.get("/v1/jobs", headers=bearer(key)).status_code == 200
    p = cli(service, "keys", "list", "--tenant", "erin")
    assert p.returncode == 0, p.stderr
    items = json.loads(p.stdout)["items"]
    assert len(items) == 1 and items[0]["prefix"] == key[:10] and items[0]["revoked_at"] is None
    assert "hash" not in p.stdout and key not in p.stdout
    p = cli(service, "keys", "revoke", items[0]["id"])
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["revoked_at"]
    assert c.get("/v1/jobs", headers=bearer(key)).status_code == 401  # the API's very next request
    p = cli(service, "keys", "list", "--tenant", "erin", "--active")
    assert p.returncode == 0 and json.loads(p.stdout)["items"] == [], p.stdout
    p = cli(service, "keys", "revoke", "key_nope")
    assert p.returncode == 1 and "not found" in p.stderr and "Traceback" not in p.stderr
    p = cli(service, "keys", "create", "--tenant", "a/../b")
    assert p.returncode != 0 and "tenant" in p.stderr and "Traceback" not in p.stderr
    # an admin key made by the CLI manages keys through the API
    assert c.get("/v1/admin/keys", headers=bearer(admin)).status_code == 200


def test_revoked_key_refused_on_the_next_request_in_every_api_process(service, admin, second_api):
    from client.sdk import ApiError, Client
    c = service.client
    ops = Client(second_api, admin, timeout=30)
    made = ops.create_key("frank")  # made through the second process
    other = httpx.Client(base_url=second_api, headers=bearer(made["key"]), timeout=30)
    for _ in range(3):  # both processes have served this key
        assert c.get("/v1/jobs", headers=bearer(made["key"])).status_code == 200
        assert other.get("/v1/jobs").status_code == 200
    assert c.delete(f"/v1/admin/keys/{made['id']}", headers=bearer(admin)).status_code == 204  # revoked in this one
    r = other.get("/v1/jobs")  # the second process's very next request
    assert r.status_code == 401 and r.json()["detail"], r.text
    assert c.get("/v1/jobs", headers=bearer(made["key"])).status_code == 401
    # revoked on the database by the CLI: both processes refuse it at once too
    key = new_key(service, "frank")
    assert other.get("/v1/jobs", headers=bearer(key)).status_code == 200
    assert c.get("/v1/jobs", headers=bearer(key)).status_code == 200
    assert cli(service, "keys", "revoke", key_id(service, key)).returncode == 0
    assert other.get("/v1/jobs", headers=bearer(key)).status_code == 401
    assert c.get("/v1/jobs", headers=bearer(key)).status_code == 401
    # the SDK's key methods; a tenant key gets 403
    assert made["id"] in [k["id"] for k in ops.keys(tenant="frank")["items"]]
    ops.revoke_key(made["id"])
    with pytest.raises(ApiError) as e:
        Client(second_api, service.keys["alice"]).keys()
    assert e.value.status == 403
    other.close()


# --------------------------------------------------------------------------- deletes
def test_openapi_documents_the_deletes(service):
    paths = service.client.get("/openapi.json").json()["paths"]
    for path, conflict in (("/v1/jobs/{job_id}", True), ("/v1/models/{model_id}", True),
                           ("/v1/checkpoints/{ckpt_id}", True), ("/v1/datasets/{dataset_id}", True),
                           ("/v1/adapters/{adapter_id}", False), ("/v1/evaluations/{eval_id}", False)):
        codes = set(paths[path]["delete"]["responses"])
        assert {"204", "401", "404"} <= codes and ("409" in codes) == conflict, (path, codes)
    assert "403" in paths["/v1/admin/keys"]["get"]["responses"]
    assert "410" in paths["/v1/models/{model_id}/file"]["get"]["responses"]


def _adapter(service, mid, tenant="alice"):
    xs = np.linspace(-4, 4, 8)
    r = service.client.post(f"/v1/models/{mid}/adapt", headers=service.h(tenant), json={
        "support": {"x": [[v] for v in xs], "y": [[float(np.sin(v))] for v in xs]}, "query": {"x": [[0.0]]},
        "steps": 5, "save_adapter": True})
    assert r.status_code == 200, r.text
    return r.json()["adapter_id"]


def _wait_eval(service, eid, pred, timeout=120):
    t0 = time.monotonic()
    while True:
        e = service.client.get(f"/v1/evaluations/{eid}", headers=service.h()).json()
        if pred(e):
            return e
        assert time.monotonic() - t0 < timeout, e
        time.sleep(0.2)


def test_delete_adapter_and_evaluation(service, reference, second_api):
    from client.sdk import ApiError, Client
    from store.models import Adapter
    c, h, bob = service.client, service.h(), service.h("bob")
    mid = reference[1]["model_id"]
    aid = _adapter(service, mid)
    f = artifact(service, Adapter, aid)
    assert f.is_file()
    assert c.delete(f"/v1/adapters/{aid}", headers=bob).status_code == 404  # another tenant's
    assert c.delete(f"/v1/adapters/{aid}", headers=h).status_code == 204
    assert not f.exists()
    assert c.get(f"/v1/adapters/{aid}", headers=h).status_code == 404
    assert c.post(f"/v1/adapters/{aid}/predict", json={"x": [[0.0]]}, headers=h).status_code == 404
    assert c.delete(f"/v1/adapters/{aid}", headers=h).status_code == 404
    # through the SDK (second API process) and the CLI
    sdk = Client(second_api, service.keys["alice"], timeout=60)
    aid2 = _adapter(service, mid)
    assert sdk.delete_adapter(aid2) is None
    with pytest.raises(ApiError) as e:
        sdk.delete_adapter(aid2)
    assert e.value.status == 404
    aid3 = _adapter(service, mid)
    p = cli(service, "delete", "adapter", aid3, "--url", second_api, "--key", service.keys["alice"])
    assert p.returncode == 0 and json.loads(p.stdout) == {"deleted": "adapter", "id": aid3}, p.stderr
    p = cli(service, "delete", "adapter", aid3, "--url", second_api, "--key", service.keys["alice"])
    assert p.returncode == 2 and "404" in p.stderr

    # evaluations: a finished one, and a queued or running one (stopped; never 409)
    r = c.post(f"/v1/models/{mid}/evaluations", headers=h, json={"n_tasks": 5, "steps": [0, 1]})
    eid = r.json()["id"]
    _wait_eval(service, eid, lambda e: e["status"] in ("succeeded", "failed"))
    assert c.delete(f"/v1/evaluations/{eid}", headers=bob).status_code == 404
    assert c.delete(f"/v1/evaluations/{eid}", headers=h).status_code == 204
    assert c.get(f"/v1/evaluations/{eid}", headers=h).status_code == 404
    assert eid not in [x["id"] for x in c.get(f"/v1/models/{mid}/evaluations", headers=h).json()["items"]]
    r = c.post(f"/v1/models/{mid}/evaluations", headers=h, json={"n_tasks": 100000, "steps": [0, 50]})
    eid = r.json()["id"]
    assert sdk.delete_evaluation(eid) is None
    assert c.get(f"/v1/evaluations/{eid}", headers=h).status_code == 404
    # the model and its reference job are untouched
    assert c.get(f"/v1/models/{mid}", headers=h).status_code == 200


def test_delete_model_then_job(service):
    from store.models import Checkpoint, Evaluation, MetaModelRow
    c, h, bob = service.client, service.h(), service.h("bob")
    jid = service.submit(small_config(steps=20, seed=7))
    j = service.wait(jid)
    assert j["status"] == "succeeded", j
    mid = j["model_id"]
    ckpts = c.get(f"/v1/jobs/{jid}/checkpoints", headers=h).json()["items"]
    ck_files = [artifact(service, Checkpoint, x["id"]) for x in ckpts]
    model_file = artifact(service, MetaModelRow, mid)
    aid = _adapter(service, mid)
    from store.models import Adapter
    adapter_file = artifact(service, Adapter, aid)
    done = c.post(f"/v1/models/{mid}/evaluations", headers=h, json={"n_tasks": 3, "steps": [0]}).json()["id"]
    _wait_eval(service, done, lambda e: e["status"] in ("succeeded", "failed"))
    assert all(f.is_file() for f in ck_files + [model_file, adapter_file])

    for path in (f"/v1/jobs/{jid}", f"/v1/models/{mid}", f"/v1/checkpoints/{ckpts[0]['id']}"):
        assert c.delete(path, headers=bob).status_code == 404, path  # another tenant's
    r = c.delete(f"/v1/jobs/{jid}", headers=h)  # its model still exists
    assert r.status_code == 409 and mid in r.json()["detail"], r.text
    assert r.headers["content-type"] == "application/problem+json"

    # a model with an evaluation still queued or running
    busy = c.post(f"/v1/models/{mid}/evaluations", headers=h, json={"n_tasks": 100000, "steps": [0, 50]}).json()["id"]
    r = c.delete(f"/v1/models/{mid}", headers=h)
    assert r.status_code == 409 and busy in r.json()["detail"], r.text
    assert c.delete(f"/v1/evaluations/{busy}", headers=h).status_code == 204

    assert c.delete(f"/v1/models/{mid}", headers=h).status_code == 204
    assert not model_file.exists() and not adapter_file.exists()
    assert c.get(f"/v1/models/{mid}", headers=h).status_code == 404
    assert c.get(f"/v1/models/{mid}/file", headers=h).status_code == 404
    assert c.get(f"/v1/adapters/{aid}", headers=h).status_code == 404  # went with the model
    assert c.get(f"/v1/evaluations/{done}", headers=h).status_code == 404
    assert mid not in [m["id"] for m in c.get("/v1/models", headers=h).json()["items"]]
    with service.app.state.db.session() as s:
        assert s.query(Evaluation).filter_by(model_id=mid).count() == 0
    assert c.delete(f"/v1/models/{mid}", headers=h).status_code == 404

    # one checkpoint of the finished job, then the job with the rest
    assert c.delete(f"/v1/checkpoints/{ckpts[0]['id']}", headers=h).status_code == 204
    assert not ck_files[0].exists() and ck_files[1].is_file()
    left = [x["id"] for x in c.get(f"/v1/jobs/{jid}/checkpoints", headers=h).json()["items"]]
    assert left == [x["id"] for x in ckpts[1:]]
    assert c.get(f"/v1/checkpoints/{ckpts[0]['id']}/file", headers=h).status_code == 404
    assert c.delete(f"/v1/jobs/{jid}", headers=h).status_code == 204
    assert not any(f.exists() for f in ck_files)
    assert not (service.settings.artifacts_dir / "jobs" / jid).exists()
    for path in (f"/v1/jobs/{jid}", f"/v1/jobs/{jid}/metrics", f"/v1/jobs/{jid}/checkpoints",
                 f"/v1/checkpoints/{ckpts[1]['id']}/file"):
        assert c.get(path, headers=h).status_code == 404, path
    with service.app.state.db.session() as s:
        assert s.query(Checkpoint).filter_by(job_id=jid).count() == 0
    assert c.delete(f"/v1/jobs/{jid}", headers=h).status_code == 404


def test_delete_running_job_cancels_it_first(service):
    c, h = service.client, service.h()
    jid = service.submit(small_config(steps=100000, seed=11))
    queued = service.submit(small_config(steps=100000, seed=12))  # behind it on the one train worker
    j = service.wait(jid, pred=lambda j: j["status"] == "running" and j["progress"]["step"] >= 12)
    ck = c.get(f"/v1/jobs/{jid}/checkpoints", headers=h).json()["items"]
    assert ck, j
    r = c.delete(f"/v1/checkpoints/{ck[0]['id']}", headers=h)  # its job is running
    assert r.status_code == 409 and jid in r.json()["detail"], r.text
    assert c.delete(f"/v1/jobs/{queued}", headers=h).status_code == 204
    assert c.get(f"/v1/jobs/{queued}", headers=h).status_code == 404

    t0 = time.monotonic()
    r = c.delete(f"/v1/jobs/{jid}", headers=h)
    took = time.monotonic() - t0
    assert r.status_code == 204, r.text
    assert took < service.settings.lease_seconds + 5, took
    assert c.get(f"/v1/jobs/{jid}", headers=h).status_code == 404
    jobdir = service.settings.artifacts_dir / "jobs" / jid
    assert not jobdir.exists()
    time.sleep(2)  # the worker had stopped (canceled) before the rows went: it writes nothing more
    assert not jobdir.exists()
    log = (service.logdir / "worker-train.log").read_text(errors="replace")
    assert f"job {jid}: lease lost" not in log and f"job {jid} failed" not in log
    # the train worker is free for the next job
    nxt = service.submit(small_config(steps=5, seed=13))
    assert service.wait(nxt, timeout=120)["status"] == "succeeded"


def _ready(service, did, timeout=120) -> dict:
    """An upload once it is no longer ``processing`` (decoded by the datasets worker)."""
    t0 = time.monotonic()
    while True:
        d = service.client.get(f"/v1/datasets/{did}", headers=service.h()).json()
        if d.get("status", "ready") != "processing":
            return d
        assert time.monotonic() - t0 < timeout, d
        time.sleep(0.2)


def _dataset_files(service, did):
    return [p for p in service.settings.artifacts_dir.rglob(f"{did}*") if p.is_file()]


def test_delete_dataset_rules(service):
    from store.models import Dataset
    c, h = service.client, service.h()
    # deleted at once, processing or not: nothing of it stays in the store once its worker has had its turn
    r = upload(service, _sinusoid_csv(n_tasks=20, seed=4), "regression", "gone.csv")
    assert r.status_code in (201, 202), r.text  # 202: accepted, processing
    gone = r.json()["id"]
    assert c.delete(f"/v1/datasets/{gone}", headers=h).status_code == 204
    assert c.get(f"/v1/datasets/{gone}", headers=h).status_code == 404
    t0 = time.monotonic()
    while _dataset_files(service, gone):
        assert time.monotonic() - t0 < 60, _dataset_files(service, gone)
        time.sleep(0.5)

    r = upload(service, _sinusoid_csv(n_tasks=20, seed=3), "regression", "del.csv")
    assert r.status_code in (201, 202), r.text
    did = r.json()["id"]
    assert _ready(service, did).get("status", "ready") == "ready"
    f = artifact(service, Dataset, did)
    assert f.is_file()
    cfg = small_config(steps=100000)
    cfg["tasks"] = {"dataset_id": did, "shots": 5, "query": 5}
    long_id = service.submit(cfg)
    r = c.delete(f"/v1/datasets/{did}", headers=h)
    assert r.status_code == 409 and long_id in r.json()["detail"], r.text
    c.post(f"/v1/jobs/{long_id}/cancel", headers=h)
    assert service.wait(long_id)["status"] == "canceled"

    cfg["outer"]["steps"] = 10
    j = service.wait(service.submit(cfg))
    assert j["status"] == "succeeded", j
    r = c.delete(f"/v1/datasets/{did}", headers=h)  # a model trained on it
    assert r.status_code == 409 and j["model_id"] in r.json()["detail"], r.text
    assert c.delete(f"/v1/datasets/{did}", headers=service.h("bob")).status_code == 404
    assert c.delete(f"/v1/models/{j['model_id']}", headers=h).status_code == 204
    assert c.delete(f"/v1/datasets/{did}", headers=h).status_code == 204
    assert not f.exists()
    assert c.get(f"/v1/datasets/{did}", headers=h).status_code == 404
    assert c.delete(f"/v1/datasets/{did}", headers=h).status_code == 404
    # the canceled job that used it stays; retried, it fails naming the dataset (no server path)
    assert c.post(f"/v1/jobs/{long_id}/retry", headers=h).status_code == 202
    j = service.wait(long_id)
    assert j["status"] == "failed" and did in j["error"]["message"], j
    no_paths(service, j["error"]["message"])


# --------------------------------------------------------------------------- no server paths in errors
def test_missing_files_are_410_and_errors_name_no_server_path(service):
    """A model and a checkpoint whose files are gone from disk: 410 on download (not a 500 naming the path),
    and the worker's errors (an evaluation, an adapt, a resumed job) name the artifact, not the file."""
    from schemas import JobConfig
    from store.models import Checkpoint, Job, MetaModelRow, new_id, utcnow
    c, h = service.client, service.h()
    cfg = JobConfig.model_validate(small_config(steps=10)).model_dump(mode="json")
    jid, mid, ckid, now = new_id("job"), new_id("mdl"), new_id("ckpt"), utcnow()
    with service.app.state.db.session() as s:
        s.add(Job(id=jid, tenant="alice", kind="train", status="canceled", config=cfg, step=5, total_steps=10,
                  attempts=1, max_attempts=3, cancel_requested=True, created_at=now, updated_at=now,
                  finished_at=now))
        s.flush()
        s.add(Checkpoint(id=ckid, job_id=jid, step=5, uri=f"file:jobs/{jid}/ckpt-gone.safetensors",
                         sha256="0" * 64, bytes=1, meta={}, created_at=now))
        s.add(MetaModelRow(id=mid, tenant="alice", job_id=jid, config=cfg, kind="regression", input_shape=[1],
                           output_dim=1, module_map=[{"name": "layers.0.weight", "n_params": 40, "sigma2": 1.0,
                                                      "selected": True}],
                           uri=f"file:models/{mid}.safetensors", sha256="0" * 64, bytes=1, created_at=now))
    for path in (f"/v1/models/{mid}/file", f"/v1/checkpoints/{ckid}/file"):
        r = c.get(path, headers=h)
        assert r.status_code == 410, (path, r.status_code, r.text)
        assert r.headers["content-type"] == "application/problem+json" and "missing" in r.json()["detail"]
        no_paths(service, r.text)
        assert c.get(path, headers=service.h("bob")).status_code == 404
    r = c.post(f"/v1/models/{mid}/adapt", headers=h, json={
        "support": {"x": [[0.0]], "y": [[0.0]]}, "query": {"x": [[0.0]]}, "steps": 1})
    assert r.status_code == 410 and "missing from the artifact store" in r.json()["detail"], r.text
    no_paths(service, r.text)
    eid = c.post(f"/v1/models/{mid}/evaluations", headers=h, json={"n_tasks": 2, "steps": [0]}).json()["id"]
    e = _wait_eval(service, eid, lambda e: e["status"] in ("succeeded", "failed"))
    assert e["status"] == "failed" and "missing from the artifact store" in e["error"]["message"], e
    no_paths(service, e["error"]["message"])
    # a retried job resumes from a checkpoint whose file is gone
    assert c.post(f"/v1/jobs/{jid}/retry", headers=h).status_code == 202
    j = service.wait(jid)
    assert j["status"] == "failed" and "missing from the artifact store" in j["error"]["message"], j
    no_paths(service, j["error"]["message"])
    # and the rows go cleanly although their files are gone
    assert c.delete(f"/v1/models/{mid}", headers=h).status_code == 204
    assert c.delete(f"/v1/jobs/{jid}", headers=h).status_code == 204
