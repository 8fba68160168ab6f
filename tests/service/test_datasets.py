"""Uploaded meta-datasets through the service (issues 4 and 12): upload (checked from headers, 202, decoded by
the datasets worker), errors at once or as ``failed``, tenancy, the quota, and jobs that train on them
(regression points; Omniglot's zips as uploaded)."""
from __future__ import annotations

import io
import time
import zipfile

import numpy as np
import pytest

from .conftest import small_config

pytestmark = pytest.mark.slow

OMNIGLOT = "/work/shared/data/omniglot"


def _sinusoid_csv(n_tasks=40, points=20, seed=0, nan=False) -> bytes:
    rng = np.random.default_rng(seed)
    lines = ["task,x,y"]
    for t in range(n_tasks):
        amp, phase = rng.uniform(0.1, 5.0), rng.uniform(0, np.pi)
        for x in rng.uniform(-5, 5, points):
            lines.append(f"t{t},{float(x)!r},{float(amp * np.sin(x - phase))!r}")
    if nan:
        lines.append("t0,1.0,nan")
    return ("\n".join(lines) + "\n").encode()


def _png(value: int, size=8) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _image_zip(classes=4, per_class=3, top="root", bad_member=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for c in range(classes):
            for i in range(per_class):
                z.writestr(f"{top}/grp{c % 2}/cls{c}/{i}.png", _png(10 * c + i))
        if bad_member:
            z.writestr(f"{top}/grp0/cls0/{bad_member}", b"not a png")
    return buf.getvalue()


def _bomb(n=6, side=3000) -> bytes:
    """Blank PNGs of side x side: a few KB compressed, n * side^2 pixels decoded."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(n):
            z.writestr(f"blank/c{i % 2}/{i}.png", _png(0, side))
    return buf.getvalue()


def upload(service, data: bytes, kind: str, filename: str, tenant="alice", **fields):
    return service.client.post("/v1/datasets", headers=service.h(tenant), files={"file": (filename, data)},
                               data={"kind": kind, **{k: str(v) for k, v in fields.items()}})


def test_upload_regression_and_train_on_it(service):
    c, h = service.client, service.h()
    r = upload(service, _sinusoid_csv(), "regression", "sines.csv")
    assert r.status_code == 202, r.text
    d = r.json()
    # accepted from its headers, decoded by the datasets worker
    assert d["status"] == "processing" and d["error"] is None and d["sha256"] is None
    assert d["rows"] == 800 and d["values"] == 1600 and d["upload"]["file"] == "sines.csv"
    d = service.wait_dataset(d["id"])
    assert d["status"] == "ready" and len(d["sha256"]) == 64 and d["bytes"] > 0 and "upload" not in d
    assert d["id"] and d["kind"] == "regression" and d["tasks"] == 40 and d["points"] == 800
    assert d["input_dim"] == 1 and d["output_dim"] == 1 and d["name"] == "sines.csv"
    assert c.get(f"/v1/datasets/{d['id']}", headers=h).json()["tasks"] == 40
    assert d["id"] in [x["id"] for x in c.get("/v1/datasets", headers=h).json()["items"]]
    # tenant-owned: bob sees nothing and cannot train on it
    assert c.get(f"/v1/datasets/{d['id']}", headers=service.h("bob")).status_code == 404
    assert d["id"] not in [x["id"] for x in c.get("/v1/datasets", headers=service.h("bob")).json()["items"]]
    cfg = small_config(steps=20)
    cfg["tasks"] = {"dataset_id": d["id"], "shots": 5, "query": 5}
    r = c.post("/v1/jobs", json=cfg, headers=service.h("bob"))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["tasks", "dataset_id"], r.text
    img = {**cfg, "tasks": {"dataset_id": d["id"], "ways": 2, "shots": 1, "query": 1}, "model": {"arch": "conv4"}}
    r = c.post("/v1/jobs", json=img, headers=h)
    assert r.status_code == 422 and "regression" in r.json()["detail"], r.text

    j = service.wait(service.submit(cfg))
    assert j["status"] == "succeeded", j
    assert j["config"]["tasks"]["family"] == "regression_dataset"
    # the adapt worker resolves the dataset too (the model's family is built from it)
    xs = [[v] for v in np.linspace(-4, 4, 5)]
    a = c.post(f"/v1/models/{j['model_id']}/adapt", headers=h, json={
        "support": {"x": xs, "y": [[float(np.sin(v[0]))] for v in xs]}, "query": {"x": [[0.5]]}, "steps": 5})
    assert a.status_code == 200, a.text
    assert len(a.json()["predictions"]) == 1


def test_upload_image_zip_small(service):
    r = upload(service, _image_zip(), "image_classes", "tiny.zip", name="tiny")
    assert r.status_code == 202, r.text
    d = r.json()  # what the headers say, before any pixel is decoded
    assert d["status"] == "processing" and d["classes"] == 4 and d["images"] == 12 and d["image_shape"] == [8, 8]
    d = service.wait_dataset(d["id"])
    assert d["status"] == "ready", d
    assert d["kind"] == "image_classes" and d["classes"] == 4 and d["images"] == 12 and d["groups"] == 2
    assert d["image_shape"] == [8, 8] and d["name"] == "tiny"
    assert d["classes_per_group"] == {"grp0": 2, "grp1": 2}
    assert d["bytes"] > 12 * 64 and len(d["sha256"]) == 64


@pytest.mark.parametrize("data,kind,fname,fields,status,needle", [
    (b"definitely not a zip", "image_classes", "x.zip", {}, 422, "x.zip: not a zip"),
    (_image_zip(bad_member="broken.png"), "image_classes", "imgs.zip", {}, 422,
     "imgs.zip: root/grp0/cls0/broken.png: unreadable image"),
    (_image_zip(per_class=2), "image_classes", "few.zip", {"min_per_class": 3}, 422, "fewer than 3"),
    (b"task,x\n1,2\n", "regression", "noy.csv", {}, 422, "noy.csv: need input columns"),
    # 54 M decoded pixels from a few KB, over the service's cap of 40 M (conftest; both Omniglot zips fit):
    # refused at the member that crosses it, from the headers, before anything is decoded or stored
    (_bomb(), "image_classes", "bomb.zip", {}, 413,
     "bomb.zip: blank/c1/3.png: the archive's images decode to more than 40,000,000"),
])
def test_upload_refused_from_headers(service, data, kind, fname, fields, status, needle):
    before = service.client.get("/v1/datasets", headers=service.h()).json()["items"]
    r = upload(service, data, kind, fname, **fields)
    assert r.status_code == status, r.text
    body = r.json()
    assert needle in body["detail"], body["detail"]
    assert body["errors"][0]["loc"] == ["body", "file"]
    assert service.client.get("/v1/datasets", headers=service.h()).json()["items"] == before  # nothing recorded


def test_nul_in_a_dataset_name_is_422_on_every_database(service):
    r = upload(service, _image_zip(), "image_classes", "tiny.zip", name="bad\x00name")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "name"], r.text


@pytest.mark.parametrize("value", ["²", "٣", "１", "9" * 5000, "-1", "0"])
def test_numeric_form_fields_take_ascii_integers_only(service, value):
    """Not a 500 (``"²".isdigit()`` is true, ``int("²")`` raises) and not a number (``int("٣")`` is 3)."""
    r = upload(service, _image_zip(), "image_classes", "tiny.zip", min_per_class=value)
    assert r.status_code == 422, r.text
    assert r.json()["errors"][0]["loc"] == ["body", "min_per_class"]


def _cut_png_zip() -> bytes:
    """A class folder whose second PNG has an intact header but cut pixel data: only decoding finds it."""
    good = _png(200, size=32)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("c0/0.png", good)
        z.writestr("c0/1.png", good[:60])
    return buf.getvalue()


@pytest.mark.parametrize("data,kind,fname,fields,needle", [
    (_cut_png_zip(), "image_classes", "cut.zip", {}, "cut.zip: c0/1.png: unreadable image"),
    (_sinusoid_csv(n_tasks=3, nan=True), "regression", "pts.csv", {}, "pts.csv: 1 row(s) with NaN"),
    (_sinusoid_csv(n_tasks=3, points=3), "regression", "short.csv", {"min_points": 5}, "fewer than 5 points"),
    (b"task,x,y\n" + b"t0," + b"1" * 2000 + b",1\n", "regression", "wide.csv", {},
     "line 2: a field longer than 1024 characters"),
    (b"task,x,y\n" + b'"' + b"a" * 200_000 + b'",1,1\n', "regression", "huge.csv", {}, "line 2: field larger than"),
    (b"task,x,y\nt0,1,2\x00\n", "regression", "nul.csv", {}, "line 2:"),
])
def test_upload_fails_in_the_worker(service, data, kind, fname, fields, needle):
    """Problems only decoding finds: 202, then ``failed`` with validate_upload's message; it stores nothing."""
    r = upload(service, data, kind, fname, **fields)
    assert r.status_code == 202, r.text
    d = service.wait_dataset(r.json()["id"])
    assert d["status"] == "failed", d
    assert needle in d["error"]["message"], d["error"]
    assert d["bytes"] == 0 and d["sha256"] is None


def test_job_on_a_processing_dataset_is_422_and_a_lost_message_is_resent(service):
    """With the datasets worker stopped, an upload stays ``processing``: a job on it is 422 naming
    tasks.dataset_id and the status. Its message is then lost (the queue emptied) and, once stale, the
    reconciler sends it again; a new worker makes it ready, and the job is accepted."""
    from sqlalchemy import update

    from store.models import Dataset, utcnow
    from worker.celery_app import DATASETS_QUEUE

    c, h = service.client, service.h("bob")
    for name in service.worker_names("datasets"):
        service.kill_worker(name)
    try:
        r = upload(service, _sinusoid_csv(n_tasks=10, seed=5), "regression", "later.csv", tenant="bob")
        assert r.status_code == 202, r.text
        did = r.json()["id"]
        cfg = small_config(steps=5)
        cfg["tasks"] = {"dataset_id": did, "shots": 5, "query": 5}
        r = c.post("/v1/jobs", json=cfg, headers=h)
        assert r.status_code == 422, r.text
        assert r.json()["errors"][0]["loc"] == ["tasks", "dataset_id"]
        assert f"dataset {did} is processing, not ready" in r.json()["detail"]
        assert service.app.state.redis.delete(DATASETS_QUEUE) == 1  # the message, lost
        with service.app.state.db.session() as s:  # ... long enough ago for the reconciler to notice
            s.execute(update(Dataset).where(Dataset.id == did)
                      .values(enqueued_at=utcnow().replace(year=2000)))
        t0 = time.monotonic()
        while not service.app.state.redis.llen(DATASETS_QUEUE):
            assert time.monotonic() - t0 < 30, "the reconciler did not re-send the dataset"
            time.sleep(0.2)
    finally:
        service.start_worker("datasets")
    d = service.wait_dataset(did, tenant="bob")
    assert d["status"] == "ready" and d["tasks"] == 10, d
    assert service.wait(service.submit(cfg, tenant="bob"), tenant="bob")["status"] == "succeeded"


def test_quota_413_and_usage(service):
    """carol's datasets against a small quota: usage in the listing; an upload that would exceed it is 413
    naming both; a failed upload stores (and counts) nothing."""
    c, h = service.client, service.h("carol")
    settings = service.app.state.settings
    page = c.get("/v1/datasets", headers=h).json()
    assert page["usage"] == {"bytes": 0, "quota": settings.tenant_quota_bytes}
    d = service.upload_ready(_sinusoid_csv(n_tasks=10), "regression", "q1.csv", tenant="carol")
    assert c.get("/v1/datasets", headers=h).json()["usage"]["bytes"] == d["bytes"]
    bad = upload(service, _sinusoid_csv(n_tasks=3, nan=True), "regression", "nan.csv", tenant="carol")
    assert service.wait_dataset(bad.json()["id"], tenant="carol")["status"] == "failed"
    assert c.get("/v1/datasets", headers=h).json()["usage"]["bytes"] == d["bytes"]
    old = settings.tenant_quota_bytes
    settings.tenant_quota_bytes = d["bytes"] + 1000
    try:
        r = upload(service, _sinusoid_csv(n_tasks=10, seed=1), "regression", "q2.csv", tenant="carol")
        assert r.status_code == 413, r.text
        detail = r.json()["detail"]
        assert f"over its quota of {d['bytes'] + 1000:,} bytes" in detail
        assert f"in use before it: {d['bytes']:,} bytes" in detail
        page = c.get("/v1/datasets", headers=h).json()
        assert page["usage"] == {"bytes": d["bytes"], "quota": d["bytes"] + 1000}
        assert len(page["items"]) == 2  # q1 and the failed one; nothing recorded for q2
        settings.tenant_quota_bytes = 0  # unlimited
        assert c.get("/v1/datasets", headers=h).json()["usage"]["quota"] is None
        assert upload(service, _sinusoid_csv(n_tasks=10, seed=1), "regression", "q2.csv",
                      tenant="carol").status_code == 202
    finally:
        settings.tenant_quota_bytes = old


def test_upload_form_errors(service):
    c, h = service.client, service.h()
    r = upload(service, _sinusoid_csv(3), "nope", "a.csv")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "kind"]
    r = c.post("/v1/datasets", headers=h, data={"kind": "regression"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "file"]
    r = upload(service, b"x" * 4_100_000, "regression", "big.csv")
    assert r.status_code == 413 and "cap" in r.json()["detail"]
    assert c.post("/v1/datasets", files={"file": ("a.csv", b"x")}, data={"kind": "regression"}).status_code == 401
