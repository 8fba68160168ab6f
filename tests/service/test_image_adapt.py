"""Images as images (issue 12, item 6): an image model records its input preprocessing; adapt and adapter predict
take image files (multipart) and answer exactly what the JSON arrays of the training preprocessing get; the CLI
adapts an Omniglot model to folders of PNG files with the accuracy of the array path."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

from datasets.omniglot import default_directory
from tests.core_helpers import light_strokes, png

OMNIGLOT = default_directory()


@pytest.fixture(scope="module")
def image_model(service):
    """An uploaded image dataset (16 classes x 3 PNGs of 16x16, light background) and a tiny conv4 job on it with
    image_size 10 (area resize in ImageClasses): the model, the PNGs and the training tensors of the images."""
    import torch

    import datasets  # noqa: F401
    from core.images import to_float
    from core.tasks import build_family
    from datasets.upload import validate_image_zip

    rng = np.random.default_rng(0)
    files, buf = {}, io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for c in range(16):
            for i in range(3):
                files[(c, i)] = png(light_strokes(rng, 16, background=245))
                z.writestr(f"letters/c{c:02d}/{i}.png", files[(c, i)])
    d = service.upload_ready(buf.getvalue(), "image_classes", "letters.zip")  # 202, then decoded by a worker
    assert d["preprocessing"] == {"decode_size": None, "invert": True}, d  # recorded by the upload
    tasks = {"dataset_id": d["id"], "ways": 3, "shots": 1, "query": 1, "image_size": 10}
    cfg = {"algorithm": {"name": "maml"}, "model": {"arch": "conv4", "channels": 4}, "tasks": tasks,
           "inner": {"lr": 0.4, "steps": 1}, "outer": {"steps": 4, "meta_batch": 2},
           "execution": {"device": "cpu"}, "run": {"checkpoint_every": 4, "module_map_every": 4, "log_every": 2},
           "seed": 0}
    j = service.wait(service.submit(cfg), timeout=300)
    assert j["status"] == "succeeded", j
    coll = validate_image_zip(buf.getvalue(), "letters.zip")
    fam = build_family({"family": "image_classes", **tasks, "source": "dataset"}, data=coll.to_arrays())
    train = {k: to_float(fam.images[k]).tolist() for k in files}  # what training hands the model for each PNG
    assert torch.as_tensor(train[(0, 0)]).shape == (1, 10, 10)
    return j["model_id"], files, train


def _parts(field, items):
    return [(field, (name, raw, "image/png")) for name, raw in items]


def test_multipart_adapt_and_predict_equal_the_json_arrays(service, image_model):
    c, h = service.client, service.h()
    mid, files, train = image_model
    m = c.get(f"/v1/models/{mid}", headers=h).json()
    assert m["preprocessing"] == {"kind": "image", "source": "dataset", "color": "L", "channels": 1,
                                  "decode_size": None, "invert": True, "size": 10, "scale": 255.0,
                                  "input_shape": [1, 10, 10], "recorded": True}, m["preprocessing"]
    assert m["input_shape"] == [1, 10, 10]
    listed = {x["id"]: x for x in c.get("/v1/models", headers=h).json()["items"]}
    assert listed[mid]["preprocessing"] == m["preprocessing"]
    sup = [(5, 0), (9, 0), (2, 0), (5, 1)]  # classes 5, 9, 2 get labels 0, 1, 2
    labels = [0, 1, 2, 0]
    qry = [(9, 2), (2, 1), (5, 2), (2, 2), (9, 1)]
    arrays = {"support": {"x": [train[k] for k in sup], "y": labels}, "query": {"x": [train[k] for k in qry]},
              "steps": 5, "modules": "all", "save_adapter": True}
    ref = c.post(f"/v1/models/{mid}/adapt", json=arrays, headers=h)
    assert ref.status_code == 200, ref.text
    ref = ref.json()
    form = _parts("support", [(f"c{k[0]}/{k[1]}.png", files[k]) for k in sup]) + \
        _parts("query", [(f"q/{n}.png", files[k]) for n, k in enumerate(qry)])
    for labels_field in ({"labels": json.dumps(labels)}, {"labels": [str(v) for v in labels]}):
        r = c.post(f"/v1/models/{mid}/adapt", headers=h, files=form,
                   data={**labels_field, "steps": "5", "modules": "all", "save_adapter": "true"})
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["predictions"] == ref["predictions"]  # bit for bit: the same inputs reached the worker
        assert got["loss_curve"] == ref["loss_curve"] and got["adapted_modules"] == ref["adapted_modules"]
        assert got["adapter_id"] and got["adapter_id"] != ref["adapter_id"]
    # an adapter predicts from image files as from the arrays
    aid = got["adapter_id"]
    pj = c.post(f"/v1/adapters/{aid}/predict", json={"x": [train[k] for k in qry]}, headers=h)
    pm = c.post(f"/v1/adapters/{aid}/predict", headers=h, files=_parts("x", [(f"{n}.png", files[k])
                                                                             for n, k in enumerate(qry)]))
    assert pj.status_code == 200 and pm.status_code == 200, (pj.text, pm.text)
    assert pm.json()["predictions"] == pj.json()["predictions"]
    # the SDK sends image paths the same way
    from client.sdk import Client
    from fastapi.testclient import TestClient
    sdk = Client("http://testserver", "unused")
    sdk.http = TestClient(service.app, headers=h)
    tmp = service.logdir / "sdk-images"
    paths = []
    for k in sup + qry:
        p = tmp / f"c{k[0]}" / f"{k[1]}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(files[k])
        paths.append(p)
    s = sdk.adapt_images(mid, paths[:len(sup)], labels, paths[len(sup):], steps=5, modules="all")
    assert s["predictions"] == ref["predictions"] and s["adapter_id"] is None
    assert sdk.predict_images(aid, paths[len(sup):])["predictions"] == pm.json()["predictions"]


def test_multipart_problems_are_422_naming_the_file(service, image_model, reference):
    c, h = service.client, service.h()
    mid, files, _ = image_model
    url = f"/v1/models/{mid}/adapt"
    sup = _parts("support", [("a/0.png", files[(0, 0)]), ("b/0.png", files[(1, 0)])])
    qry = _parts("query", [("q/0.png", files[(0, 1)])])

    def post(form, data=None, target=url):
        return c.post(target, headers=h, files=form, data={"labels": "[0, 1]"} if data is None else data)

    r = post(sup[:1] + _parts("support", [("b/broken.png", b"not an image")]) + qry)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["support", 1], r.text
    assert "b/broken.png" in r.json()["detail"] and "unreadable image" in r.json()["detail"]
    assert r.json()["errors"][0]["file"] == "b/broken.png"
    big = png(np.zeros((4200, 4200), np.uint8))  # 17.6M pixels, above the per-image cap, ~20 KB as a PNG
    r = post(sup + _parts("query", [("q/0.png", files[(0, 1)]), ("q/huge.png", big)]))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query", 1], r.text
    assert "q/huge.png" in r.json()["detail"] and "above the cap" in r.json()["detail"]
    r = post(sup + qry, {"labels": "[0]"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["labels"], r.text
    assert "1 labels for 2 support files" in r.json()["detail"]
    r = post(sup + qry, {"labels": ["0", "x"]})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["labels", 1], r.text
    for odd in ("１", "٣"):  # Unicode digits are not integers here (int() would take them)
        r = post(sup + qry, {"labels": ["0", odd]})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["labels", 1], r.text
        r = post(sup + qry, {"labels": "[0, 1]", "steps": odd})
        assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["steps"], r.text
    r = post(sup + qry, {"labels": "[0, 7]"})  # the model has 3 classes
    assert r.status_code == 422 and "class labels must be in [0, 2]" in r.json()["detail"], r.text
    r = post(sup)
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query"], r.text
    r = post(sup + qry, {"labels": "[0, 1]", "steps": "lots"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["steps"], r.text
    r = post(sup + qry, {"labels": "[0, 1]", "modules": "nope"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["modules"], r.text
    r = post(sup + qry, {"labels": "[0, 1]", "colour": "red"})
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["colour"], r.text
    # caps as the JSON path: the rows cap (counted before decoding) and the body cap (413)
    rows = service.settings.adapt_max_rows
    tiny = png(np.zeros((2, 2), np.uint8))
    r = post(sup + _parts("query", [(f"q/{i}.png", tiny) for i in range(rows + 1)]))
    assert r.status_code == 422 and r.json()["errors"][0]["loc"] == ["query"], r.text
    assert f"above the cap of {rows} rows" in r.json()["detail"]
    r = post(sup + _parts("query", [("q/pad.png", b"\0" * (service.settings.adapt_max_bytes + 1))]))
    assert r.status_code == 413, r.text
    # a model that was not trained on images says so; another tenant's model is 404 either way
    r = post(sup + qry, target=f"/v1/models/{reference[1]['model_id']}/adapt")
    assert r.status_code == 422 and "not trained on images" in r.json()["detail"], r.text
    r = c.post(url, headers=service.h("bob"), files=sup + qry, data={"labels": "[0, 1]"})
    assert r.status_code == 404, r.text


def test_older_models_derive_their_preprocessing_or_say_why(service, image_model):
    """A model published before preprocessing was recorded (models.preprocessing NULL): derived from its config
    and its dataset's summary (recorded: false), and image files work; when the dataset's summary cannot tell,
    GET shows null and image adapt is 422 saying so."""
    from sqlalchemy import update

    from store.models import Dataset, MetaModelRow
    c, h = service.client, service.h()
    mid, files, _ = image_model
    recorded = c.get(f"/v1/models/{mid}", headers=h).json()["preprocessing"]
    db = service.app.state.db
    with db.session() as s:
        m = s.get(MetaModelRow, mid)
        pre, did = m.preprocessing, m.config["tasks"]["dataset_id"]
        summary = s.get(Dataset, did).summary
        s.execute(update(MetaModelRow).where(MetaModelRow.id == mid).values(preprocessing=None))
    form = _parts("support", [("a/0.png", files[(0, 0)]), ("b/0.png", files[(1, 0)])]) + \
        _parts("query", [("q/0.png", files[(0, 1)]), ("q/1.png", files[(1, 1)])])
    try:
        assert c.get(f"/v1/models/{mid}", headers=h).json()["preprocessing"] == {**recorded, "recorded": False}
        r = c.post(f"/v1/models/{mid}/adapt", headers=h, files=form, data={"labels": "[0, 1]", "steps": "1"})
        assert r.status_code == 200, r.text
        with db.session() as s:  # a summary that says nothing about how its images were made
            s.execute(update(Dataset).where(Dataset.id == did).values(
                summary={k: v for k, v in summary.items() if k not in ("preprocessing", "notes")}))
        assert c.get(f"/v1/models/{mid}", headers=h).json()["preprocessing"] is None
        r = c.post(f"/v1/models/{mid}/adapt", headers=h, files=form, data={"labels": "[0, 1]"})
        assert r.status_code == 422 and "cannot be derived" in r.json()["detail"], r.text
        assert "JSON arrays" in r.json()["detail"]
    finally:
        with db.session() as s:
            s.execute(update(Dataset).where(Dataset.id == did).values(summary=summary))
            s.execute(update(MetaModelRow).where(MetaModelRow.id == mid).values(preprocessing=pre))


def test_openapi_documents_both_bodies(service):
    doc = service.client.get("/openapi.json").json()
    for path, fields in (("/v1/models/{model_id}/adapt", {"support", "labels", "query", "steps", "modules",
                                                          "save_adapter"}),
                         ("/v1/adapters/{adapter_id}/predict", {"x"})):
        content = doc["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"application/json", "multipart/form-data"}, content.keys()
        assert set(content["multipart/form-data"]["schema"]["properties"]) == fields
    props = doc["components"]["schemas"]["ModelOut"]["properties"]
    assert "preprocessing" in props


# --------------------------------------------------------------------------- the CLI on an Omniglot model
def _omniglot_members() -> dict:
    """``{"Alphabet/characterNN": [(zip path, member), ...]}`` in the order the training reader keeps them (the
    first zip that holds a character wins; its files sorted by name)."""
    out: dict = {}
    for path in sorted(OMNIGLOT.glob("images_*.zip")):
        seen: dict = {}
        with zipfile.ZipFile(path) as z:
            for m in sorted(z.namelist()):
                parts = m.split("/")
                if m.endswith(".png") and len(parts) == 4:
                    seen.setdefault(f"{parts[1]}/{parts[2]}", []).append((path, m))
        for k, v in seen.items():
            out.setdefault(k, v)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not list(OMNIGLOT.glob("images_*.zip")), reason=f"no Omniglot zips in {OMNIGLOT}")
def test_cli_adapts_an_omniglot_model_to_png_folders_like_the_arrays(service, tmp_path, monkeypatch, capsys):
    """A small MAML conv4 trained on Omniglot (the pattern and budget of test_omniglot_upload_train_evaluate, on the
    built-in source), then 4 held-out 5-way 1-shot tasks written as PNG folders (the zip's own 105x105 files):
    `metashrink adapt MODEL --support DIR --query DIR` predicts exactly what the JSON arrays of the training
    tensors get, so the accuracies are equal; the JSON form of the command still works."""
    import datasets  # noqa: F401
    from client import cli
    from client.sdk import Client
    from core.images import to_float
    from core.tasks import build_family
    from fastapi.testclient import TestClient

    c, h = service.client, service.h()
    tasks = {"family": "image_classes", "source": "omniglot", "ways": 5, "shots": 1, "query": 5, "image_size": 28,
             "rotations": True, "split": {"by": "class", "test_fraction": 0.2, "seed": 0}}
    cfg = {"algorithm": {"name": "maml"}, "model": {"arch": "conv4", "channels": 16}, "tasks": tasks,
           "inner": {"lr": 0.4, "steps": 1}, "outer": {"steps": 150, "meta_batch": 8, "lr_phi": 3e-3},
           "execution": {"device": "cpu", "vectorize": "vmap"},
           "run": {"checkpoint_every": 50, "module_map_every": 50, "log_every": 10}, "seed": 0}
    j = service.wait(service.submit(cfg), timeout=600)
    assert j["status"] == "succeeded", j
    mid = j["model_id"]
    pre = c.get(f"/v1/models/{mid}", headers=h).json()["preprocessing"]
    assert pre["source"] == "omniglot" and pre["decode_size"] == 28 and pre["invert"] is True, pre

    fam = build_family(tasks)  # the same split as the job's: test characters never reached meta-training
    names = fam.class_names
    members = _omniglot_members()
    test_chars = fam.classes("test").tolist()
    rng = np.random.default_rng(0)

    def sdk(_a):
        client = Client("http://testserver", "unused")
        client.http = TestClient(service.app, headers=h)
        return client
    monkeypatch.setattr(cli, "_client", sdk)

    folder_hits = array_hits = n = 0
    for t in range(4):
        chars = [int(v) for v in rng.choice(test_chars, 5, replace=False)]
        inst = rng.permutation(20)[:4]  # 1 support + 3 query images per character
        root = tmp_path / f"task{t}"
        folders = {ci: names[ci].replace("/", "_") for ci in chars}
        for ci in chars:
            for role, idx in (("support", inst[:1]), ("query", inst[1:])):
                d = root / role / folders[ci]
                d.mkdir(parents=True)
                for i in idx:
                    zpath, member = members[names[ci]][int(i)]
                    with zipfile.ZipFile(zpath) as z:
                        (d / f"{int(i):02d}.png").write_bytes(z.read(member))
        # the array path: the training tensors of the same images, in the order the CLI sends them (folders
        # sorted, files sorted), labels 0..4 by sorted folder name
        order = sorted(chars, key=lambda ci: folders[ci])
        label = {ci: k for k, ci in enumerate(order)}
        xs = [to_float(fam.images[ci, int(i)]).tolist() for ci in order for i in sorted(inst[:1])]
        ys = [label[ci] for ci in order]
        xq, yq = [], []
        for ci in order:
            for i in sorted(inst[1:]):
                xq.append(to_float(fam.images[ci, int(i)]).tolist())
                yq.append(label[ci])
        body = {"support": {"x": xs, "y": ys}, "query": {"x": xq}, "steps": 3, "modules": "all"}
        assert len(json.dumps(body)) < service.settings.adapt_max_bytes
        ref = c.post(f"/v1/models/{mid}/adapt", json=body, headers=h)
        assert ref.status_code == 200, ref.text
        ref_pred = ref.json()["predictions"]
        array_acc = float(np.mean(np.argmax(ref_pred, 1) == np.array(yq)))

        capsys.readouterr()
        rc = cli.main(["adapt", mid, "--support", str(root / "support"), "--query", str(root / "query"),
                       "--steps", "3", "--modules", "all", "--json"])
        assert rc == 0
        out = json.loads(capsys.readouterr().out)
        assert out["classes"] == [folders[ci] for ci in order]
        assert out["logits"] == ref_pred  # bit for bit
        assert out["accuracy"] == array_acc
        folder_hits += round(out["accuracy"] * len(yq))
        array_hits += round(array_acc * len(yq))
        n += len(yq)
        if t == 0:  # the human-readable form prints the class mapping and the accuracy
            assert cli.main(["adapt", mid, "--support", str(root / "support"), "--query", str(root / "query"),
                             "--steps", "3", "--modules", "all"]) == 0
            text = capsys.readouterr().out
            assert text.startswith("classes (label: support folder): 0: ") and f"accuracy: {array_acc:.4f}" in text
            # the JSON form of the command is unchanged
            (tmp_path / "support.json").write_text(json.dumps(body))
            assert cli.main(["adapt", mid, str(tmp_path / "support.json")]) == 0
            assert json.loads(capsys.readouterr().out) == ref_pred
            # unlabeled query folder: predictions, no accuracy
            loose = tmp_path / "loose"
            loose.mkdir()
            for p in sorted((root / "query").rglob("*.png"))[:3]:
                (loose / f"{p.parent.name}-{p.name}").write_bytes(p.read_bytes())
            assert cli.main(["adapt", mid, "--support", str(root / "support"), "--query", str(loose), "--json",
                             "--steps", "3"]) == 0
            o = json.loads(capsys.readouterr().out)
            assert o["accuracy"] is None and len(o["predictions"]) == 3 and "true" not in o["predictions"][0]
    print(f"Omniglot 5-way 1-shot, 4 held-out tasks x 15 queries, 3 steps: folder accuracy {folder_hits / n:.3f}, "
          f"array accuracy {array_hits / n:.3f}")
    assert folder_hits == array_hits
    assert folder_hits / n > 0.4  # a trained model (chance is 0.2), so that equal accuracies mean something
