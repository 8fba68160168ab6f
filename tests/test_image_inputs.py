"""Image files as model inputs (issue 12, item 6): a model's recorded preprocessing applied to a PNG gives the
tensor its training data gave, bit for bit (uploaded datasets and Omniglot), and bad files are named."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import torch

import datasets  # noqa: F401  (registers the data sources)
from core.images import to_float
from core.tasks import build_family
from datasets.images import preprocess_image, preprocess_images
from datasets.omniglot import default_directory, load_omniglot
from datasets.upload import UploadError, validate_image_zip
from store.preprocessing import image_preprocessing
from tests.core_helpers import light_strokes, png

OMNIGLOT = default_directory()
needs_omniglot = pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").exists(),
                                    reason=f"no Omniglot zips in {OMNIGLOT}")


def upload_zip(classes=10, per_class=3, side=12, seed=0, rgb=False):
    rng = np.random.default_rng(seed)
    files = {}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for c in range(classes):
            for i in range(per_class):
                a = light_strokes(rng, side)
                raw = png(np.stack([a, a, 255 - a // 3], -1)) if rgb else png(a)
                files[(c, i)] = raw
                z.writestr(f"top/cls{c}/{i:02d}.png", raw)
    return buf.getvalue(), files


@pytest.mark.parametrize("image_size", [8, 12, 20, None])
@pytest.mark.parametrize("rgb", [False, True])
def test_png_of_an_upload_gives_the_training_tensor_bit_for_bit(image_size, rgb):
    """Shrinking (area), same size, enlarging (bilinear) and no resize; colour PNGs converted to grey as in training."""
    data, files = upload_zip(rgb=rgb)
    coll = validate_image_zip(data, "up.zip")
    assert coll.preprocessing == {"decode_size": None, "invert": True}  # light background: inverted
    tasks = {"family": "image_classes", "source": "dataset", "dataset_id": "d", "ways": 2, "shots": 1, "query": 1,
             "image_size": image_size}
    fam = build_family(tasks, data=coll.to_arrays())
    spec, why = image_preprocessing(tasks, fam.input_shape, [coll.summary()])
    assert spec is not None, why
    assert spec["input_shape"] == list(fam.input_shape) and spec["invert"] is True
    # an upload made before the summary recorded its preprocessing: derived from its notes, the same
    legacy = {k: v for k, v in coll.summary().items() if k != "preprocessing"}
    assert image_preprocessing(tasks, fam.input_shape, [legacy])[0] == spec
    for (c, i), raw in files.items():
        train = to_float(fam.images[c, i])  # what ImageClasses._gather hands the model for this image
        x = preprocess_image(raw, spec, f"cls{c}/{i}.png")
        assert x.dtype == torch.float32 and x.shape == train.shape
        assert torch.equal(x, train), (c, i)
    batch = preprocess_images([(f"{c}-{i}", raw) for (c, i), raw in files.items()], spec)
    assert np.array_equal(batch, torch.stack([to_float(fam.images[c, i]) for c, i in files]).numpy())


@needs_omniglot
def test_omniglot_png_gives_the_training_tensor_bit_for_bit():
    """The official zip's PNGs (105x105, 1-bit) -> decode, box-resize to 28, invert, /255: the training tensors."""
    path = OMNIGLOT / "images_background_small1.zip"
    data = load_omniglot(image_size=28)
    tasks = {"family": "image_classes", "source": "omniglot", "ways": 5, "shots": 1, "query": 1, "image_size": 28}
    fam = build_family(tasks, data={**data, "images": np.array(data["images"])})
    spec, why = image_preprocessing(tasks, fam.input_shape)
    assert spec == {"kind": "image", "source": "omniglot", "color": "L", "channels": 1, "decode_size": 28,
                    "invert": True, "size": 28, "scale": 255.0, "input_shape": [1, 28, 28]}, why
    index = {name: c for c, name in enumerate(data["class_names"])}
    with zipfile.ZipFile(path) as z:
        members: dict = {}
        for m in sorted(z.namelist()):
            parts = m.split("/")
            if m.endswith(".png") and len(parts) == 4:
                members.setdefault(f"{parts[1]}/{parts[2]}", []).append(m)
        names = sorted(members)
        checked = 0
        for name in names[::7]:
            for i in (0, 9, 19):
                x = preprocess_image(z.read(members[name][i]), spec, members[name][i])
                assert torch.equal(x, to_float(fam.images[index[name], i])), (name, i)
                checked += 1
    assert checked >= 30


def test_bad_files_are_named():
    spec = {"kind": "image", "color": "L", "channels": 1, "decode_size": None, "invert": False, "size": None,
            "scale": 255.0, "input_shape": [1, 12, 12]}
    ok = png(np.zeros((12, 12), np.uint8))
    with pytest.raises(UploadError, match="b.png: unreadable image"):
        preprocess_images([("a.png", ok), ("b.png", b"not an image")], spec)
    with pytest.raises(UploadError, match="c.png: image of 13x12 pixels .* takes \\[1, 12, 12\\]"):
        preprocess_images([("c.png", png(np.zeros((12, 13), np.uint8)))], spec)
    spec28 = {**spec, "size": 28, "input_shape": [1, 28, 28]}
    assert preprocess_images([("c.png", png(np.zeros((12, 13), np.uint8)))], spec28).shape == (1, 1, 28, 28)


def test_payload_files_become_the_json_arrays():
    """What a multipart request sends the adapt worker (api.images.pack_files through worker.wire) becomes, in
    the worker (payload_inputs), the float64 arrays the JSON body of the training tensors would carry; a file
    refused there carries its [field, index]."""
    from api.images import pack_files
    from datasets.images import ImageInputError, payload_inputs
    from worker.wire import pack, unpack

    data, files = upload_zip()
    coll = validate_image_zip(data, "up.zip")
    tasks = {"family": "image_classes", "source": "dataset", "dataset_id": "d", "ways": 2, "shots": 1, "query": 1,
             "image_size": 8}
    fam = build_family(tasks, data=coll.to_arrays())
    spec, _ = image_preprocessing(tasks, fam.input_shape, [coll.summary()])
    sup, qry = [(0, 0), (1, 0)], [(0, 1), (1, 2), (3, 1)]
    payload = {"support": {"images": pack_files([(f"{k}", files[k]) for k in sup]), "y": [0, 1]},
               "query": {"images": pack_files([(f"{k}", files[k]) for k in qry])}, "preprocessing": spec}
    got = payload_inputs(unpack(json.loads(json.dumps(pack(payload)))))
    as_json = np.array([to_float(fam.images[k]).tolist() for k in qry])  # what the JSON path's as_array makes
    assert got["query"]["x"].dtype == as_json.dtype and np.array_equal(got["query"]["x"], as_json)
    assert np.array_equal(got["support"]["x"], np.array([to_float(fam.images[k]).tolist() for k in sup]))
    assert "images" not in got["support"] and got["support"]["y"] == [0, 1]
    bad = {"images": pack_files([("ok.png", files[(0, 0)]), ("trunc.png", files[(0, 1)][:60])]), "preprocessing": spec}
    with pytest.raises(ImageInputError, match="trunc.png: unreadable image") as e:
        payload_inputs(unpack(pack(bad)))
    assert e.value.loc == ["x", 1]
    assert payload_inputs({"x": [[1.0]]}) == {"x": [[1.0]]}  # a JSON request's payload is left alone


def test_preprocessing_is_derived_or_refused_with_a_reason():
    shape = [1, 28, 28]
    assert image_preprocessing({"family": "sinusoid"}, [1])[0] is None
    spec, _ = image_preprocessing({"family": "image_classes", "source": "omniglot", "image_size": None}, [1, 105, 105])
    assert spec["decode_size"] is None and spec["size"] is None and spec["input_shape"] == [1, 105, 105]
    ds = {"family": "image_classes", "source": "dataset", "dataset_id": ["a", "b"], "image_size": 28}
    inv = {"kind": "image_classes", "notes": [], "preprocessing": {"decode_size": None, "invert": True}}
    plain = {"kind": "image_classes", "notes": [], "preprocessing": {"decode_size": None, "invert": False}}
    assert image_preprocessing(ds, shape, [inv, inv])[0]["invert"] is True
    spec, why = image_preprocessing(ds, shape, [inv, plain])
    assert spec is None and "preprocessed differently" in why
    spec, why = image_preprocessing(ds, shape, [inv, None])
    assert spec is None and "gone" in why
