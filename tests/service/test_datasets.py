"""Uploaded meta-datasets through the service (issue 4): upload, validation errors, tenancy, and jobs that
train on them (regression points; Omniglot's zips as uploaded)."""
from __future__ import annotations

import io
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
    assert r.status_code == 201, r.text
    d = r.json()
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
    assert r.status_code == 201, r.text
    d = r.json()
    assert d["kind"] == "image_classes" and d["classes"] == 4 and d["images"] == 12 and d["groups"] == 2
    assert d["image_shape"] == [8, 8] and d["name"] == "tiny"
    assert d["classes_per_group"] == {"grp0": 2, "grp1": 2}


@pytest.mark.parametrize("data,kind,fname,fields,needle", [
    (b"definitely not a zip", "image_classes", "x.zip", {}, "x.zip: not a zip"),
    (_image_zip(bad_member="broken.png"), "image_classes", "imgs.zip", {}, "broken.png"),
    (_image_zip(per_class=2), "image_classes", "few.zip", {"min_per_class": 3}, "fewer than 3"),
    (_sinusoid_csv(n_tasks=3, nan=True), "regression", "pts.csv", {}, "pts.csv: 1 row(s) with NaN"),
    (b"task,x\n1,2\n", "regression", "noy.csv", {}, "noy.csv"),
    (_sinusoid_csv(n_tasks=3, points=3), "regression", "short.csv", {"min_points": 5}, "fewer than 5 points"),
    # 54 M decoded pixels from a few hundred KB, over the service's cap of 40 M (conftest; both Omniglot zips
    # fit): refused at the member that crosses it, from its header, before it is decoded
    (_bomb(), "image_classes", "bomb.zip", {},
     "blank/c1/3.png: the archive's images decode to more than 40,000,000"),
    (b"task,x,y\n" + b"t0," + b"1" * 2000 + b",1\n", "regression", "wide.csv", {},
     "line 2: a field longer than 1024 characters"),
    (b"task,x,y\n" + b'"' + b"a" * 200_000 + b'",1,1\n', "regression", "huge.csv", {}, "line 2: field larger than"),
    (b"task,x,y\nt0,1,2\x00\n", "regression", "nul.csv", {}, "line 2:"),
])
def test_upload_validation_422(service, data, kind, fname, fields, needle):
    r = upload(service, data, kind, fname, **fields)
    assert r.status_code == 422, r.text
    body = r.json()
    assert needle in body["detail"], body["detail"]
    assert body["errors"][0]["loc"] == ["body", "file"]


def test_upload_form_errors(service):
    c, h = service.client, service.h()
    r = upload(service, _sinusoid_csv(3), "nope", "a.csv")
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "kind"]
    r = c.post("/v1/datasets", headers=h, data={"kind": "regression"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["body", "file"]
    r = upload(service, b"x" * 4_100_000, "regression", "big.csv")
    assert r.status_code == 413 and "cap" in r.json()["detail"]
    assert c.post("/v1/datasets", files={"file": ("a.csv", b"x")}, data={"kind": "regression"}).status_code == 401
