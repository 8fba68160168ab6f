"""Omniglot read from the official zips, and validation of uploaded datasets (good and bad files)."""
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
from core.tasks import build_family
from datasets import UploadError, combine_image_collections, validate_image_zip, validate_regression
from datasets.omniglot import default_directory, load_omniglot

OMNIGLOT = default_directory()
needs_omniglot = pytest.mark.skipif(not list(OMNIGLOT.glob("images_*.zip")), reason=f"no Omniglot zips in {OMNIGLOT}")


@needs_omniglot
def test_omniglot_zips_distinct_characters_and_drawers():
    data = load_omniglot(image_size=28)
    imgs = data["images"]
    assert imgs.shape == (242, 20, 28, 28) and imgs.dtype == np.uint8
    assert len(set(data["class_names"])) == 242
    assert data["group_names"] == ["Balinese", "Early_Aramaic", "Greek", "Japanese_(katakana)", "Korean",
                                   "Latin", "Sanskrit", "Tagalog"]
    assert imgs.mean() < 60 and imgs.max() == 255  # inverted: strokes high, background 0
    assert load_omniglot(image_size=28) is data  # cached per process
    # 20 different drawers per character: the file names end in _01 .. _20
    for path in sorted(OMNIGLOT.glob("images_background_small*.zip")):
        with zipfile.ZipFile(path) as z:
            by_char = {}
            for n in z.namelist():
                if n.endswith(".png"):
                    parts = n.split("/")
                    by_char.setdefault((parts[1], parts[2]), set()).add(parts[3][-6:-4])
        assert all(d == {f"{i:02d}" for i in range(1, 21)} for d in by_char.values())
    # Greek and Latin are in both zips and count once
    greek = [n for n in data["class_names"] if n.startswith("Greek/")]
    assert len(greek) == 24 and len(set(greek)) == 24


@needs_omniglot
def test_omniglot_family_rotations_and_group_split():
    tasks = {"family": "image_classes", "source": "omniglot", "ways": 5, "shots": 1, "query": 2, "image_size": 28,
             "rotations": True, "split": {"by": "group", "test_fraction": 0.25, "seed": 0}}
    fam = build_family(tasks)
    s = fam.summary()
    assert s["test_groups"] == 2 and s["train_groups"] == 6
    assert s["train_classes"] + s["test_classes"] == 242
    b = fam.sample(3, torch.Generator().manual_seed(0), "test")
    assert b.xs.shape == (3, 5, 1, 28, 28) and b.xq.shape == (3, 10, 1, 28, 28)
    # a rotated character is a different image of the same character
    base = torch.tensor(load_omniglot(image_size=28)["images"][0, 0])
    assert not torch.equal(torch.rot90(base, 1), base)


def make_zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return buf.getvalue()


def png(value=0, size=(10, 10), mode="L"):
    from PIL import Image
    buf = io.BytesIO()
    arr = np.full(size[::-1], value, dtype=np.uint8)
    if mode == "L":
        arr[2:5, 2:5] = 255 - value
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def test_upload_grouped_zip_with_top_folder():
    files = {f"top/G{g}/C{c}/{i}.png": png(255) for g in range(2) for c in range(3) for i in range(4)}
    files["top/G0/C0/readme.txt"] = b"ignored"
    files["__MACOSX/._x.png"] = b"junk"
    coll = validate_image_zip(make_zip(files), "chars.zip", min_per_class=4)
    s = coll.summary()
    assert s["classes"] == 6 and s["groups"] == 2 and s["images"] == 24 and s["image_shape"] == [10, 10]
    arr = coll.to_arrays()
    assert arr["images"].shape == (6, 4, 10, 10) and arr["groups"] == [0, 0, 0, 1, 1, 1]
    assert arr["images"][0, 0, 0, 0] == 0 and arr["images"][0, 0, 3, 3] == 255  # white background inverted
    # ungrouped CLASS/*.png, resized
    coll2 = validate_image_zip(make_zip({f"C{c}/{i}.png": png(0, (12, 9)) for c in range(2) for i in range(3)}),
                               "flat.zip", image_size=8)
    assert coll2.summary()["groups"] == 1 and coll2.to_arrays()["images"].shape == (2, 3, 8, 8)
    # combining uploads: the same group/class path counts once
    both = combine_image_collections([coll, coll])
    assert len(both.keys) == 6


def test_upload_registered_dataset_reaches_family():
    files = {f"G{g}/C{c}/{i}.png": png(255) for g in range(2) for c in range(5) for i in range(4)}
    datasets.register_dataset("d1", validate_image_zip(make_zip(files), "u.zip"))
    fam = build_family({"family": "image_classes", "source": "dataset", "dataset_id": ["d1"], "ways": 2,
                        "shots": 1, "query": 1, "image_size": 8})
    assert fam.sample(2, torch.Generator().manual_seed(0)).xs.shape == (2, 2, 1, 8, 8)
    datasets.unregister_dataset("d1")


@pytest.mark.parametrize("files, problem", [
    ({"C0/0.png": b"not a png", "C0/1.png": png()}, "unreadable image"),
    ({"C0/0.png": png(size=(10, 10)), "C0/1.png": png(size=(12, 10))}, "inconsistent image shapes"),
    ({"C0/0.png": png(), "C1/0.png": png(), "C1/1.png": png()}, "fewer than 2 images"),
    ({"G/C0/0.png": png(), "C1/0.png": png()}, "expected GROUP/CLASS"),
    ({"readme.txt": b"x"}, "no images"),
])
def test_upload_bad_zips(files, problem):
    with pytest.raises(UploadError, match=problem) as e:
        validate_image_zip(make_zip(files), "bad.zip", min_per_class=2)
    assert e.value.file == "bad.zip" and str(e.value).startswith("bad.zip")


def test_upload_not_a_zip():
    with pytest.raises(UploadError, match="not a zip"):
        validate_image_zip(b"hello", "x.zip")


@needs_omniglot
def test_omniglot_zip_validates_as_upload():
    raw = (OMNIGLOT / "images_background_small1.zip").read_bytes()
    coll = validate_image_zip(raw, "images_background_small1.zip", min_per_class=20)
    s = coll.summary()
    assert s["classes"] == 136 and s["groups"] == 5 and s["image_shape"] == [105, 105]
    assert any("inverted" in n for n in s["notes"])


def test_regression_csv_and_npz():
    rows = ["task,x0,x1,y"] + [f"{t},{i},{i * 2},{len(t) + i}" for t in ("a", "bb") for i in range(6)]
    coll = validate_regression("\n".join(rows).encode(), "pts.csv", min_points=5)
    s = coll.summary()
    assert s["tasks"] == 2 and s["points"] == 12 and s["input_dim"] == 2 and s["output_dim"] == 1
    buf = io.BytesIO()
    np.savez(buf, task=np.repeat(np.arange(3), 4), x=np.arange(12.0), y=np.arange(12.0) ** 2)
    coll = validate_regression(buf.getvalue(), "pts.npz", min_points=4)
    assert coll.summary()["tasks"] == 3
    datasets.register_dataset("r1", coll)
    fam = build_family({"family": "regression_dataset", "source": "dataset", "dataset_id": "r1", "shots": 2,
                        "query": 2, "split": {"test_fraction": 0.34, "val_fraction": 0.0, "seed": 0}})
    b = fam.sample(5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(b.ys, b.xs ** 2)
    datasets.unregister_dataset("r1")


def test_regression_bad_files():
    with pytest.raises(UploadError, match=r"pts.csv: .*NaN/Inf") as e:
        validate_regression(b"task,x,y\n0,1,nan\n0,2,3\n", "pts.csv")
    assert "np." not in str(e.value), str(e.value)  # the task as the file wrote it, not a numpy repr
    with pytest.raises(UploadError, match=r"fewer than 3 points"):
        validate_regression(b"task,x,y\n0,1,1\n0,2,3\n", "pts.csv", min_points=3)
    with pytest.raises(UploadError, match="no 'task' column"):
        validate_regression(b"x,y\n1,2\n", "pts.csv")
    with pytest.raises(UploadError, match="line 3: not a number"):
        validate_regression(b"task,x,y\n0,1,1\n0,two,3\n", "pts.csv")
    buf = io.BytesIO()
    np.savez(buf, task=np.array([0, 0], dtype=object), x=np.zeros(2), y=np.zeros(2))  # needs pickle: refused
    with pytest.raises(UploadError, match="pts.npz"):
        validate_regression(buf.getvalue(), "pts.npz")
    buf = io.BytesIO()
    np.savez(buf, task=np.zeros(3), x=np.zeros(2), y=np.zeros(3))
    with pytest.raises(UploadError, match="inconsistent lengths"):
        validate_regression(buf.getvalue(), "pts.npz")
    buf = io.BytesIO()
    np.savez(buf, task=np.zeros(2, dtype=int), x=np.array([0.0, np.inf]), y=np.zeros(2))
    with pytest.raises(UploadError, match="NaN/Inf in 'x'"):
        validate_regression(buf.getvalue(), "pts.npz")
