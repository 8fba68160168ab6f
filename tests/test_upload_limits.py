"""The header pass over uploads (store/uploads.py, issue 12): every limit is checked from headers, before any
pixel is decoded or any number parsed; over-limit uploads are UploadTooLarge (413) naming the member."""
from __future__ import annotations

import io
import sys
import tracemalloc
import zipfile

import numpy as np
import pytest
from PIL import Image, ImageFile

from store.uploads import (UploadError, UploadLimits, UploadTooLarge, scan_image_zip, scan_regression,
                           scan_upload)


def _png(side=8, value=0, size=None) -> bytes:
    buf = io.BytesIO()
    w, h = size or (side, side)
    Image.fromarray(np.full((h, w), value, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for k, v in files.items():
            z.writestr(k, v)
    return buf.getvalue()


def _bomb(n=40, side=4096) -> bytes:
    """benchmarks/hostile_input.py's bomb: n blank side x side PNGs, ~10 KB zipped, n * side^2 pixels decoded."""
    png = _png(side)
    return _zip({f"blank/c{i % 2}/{i}.png": png for i in range(n)})


@pytest.fixture
def no_decoding(monkeypatch):
    """Any image decode (ImageFile.load) in the test fails it."""
    def load(self):
        raise AssertionError(f"an image was decoded: {self}")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


def test_bomb_refused_from_headers_with_small_memory(no_decoding):
    data = _bomb()
    assert len(data) < 20_000
    tracemalloc.start()
    with pytest.raises(UploadTooLarge) as e:
        scan_image_zip(data, "bomb.zip")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert e.value.status == 413 and e.value.member == "blank/c0/38.png"  # the 17th image in sorted order
    assert "decode to more than 268,435,456 pixels" in str(e.value)
    assert peak < 5 * 2 ** 20, peak  # one 4096x4096 image alone would be 16 MiB


def test_bomb_refused_by_the_decoding_validator_before_decoding(no_decoding):
    """The worker's validator (datasets.upload) runs the same pass first."""
    from datasets.upload import validate_upload
    with pytest.raises(UploadTooLarge, match="blank/c0/38.png"):
        validate_upload(_bomb(), "bomb.zip", "image_classes")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's, between 1x and 2x its cap
def test_per_image_cap_and_pillows_guard(no_decoding):
    limits = UploadLimits(max_image_pixels=100 * 100)
    data = _zip({"a/0.png": _png(100), "a/1.png": _png(size=(101, 100))})
    with pytest.raises(UploadTooLarge, match=r"a/1.png: image of 101x100 pixels is above the cap of 10,000"):
        scan_image_zip(data, "x.zip", limits=limits)
    assert Image.MAX_IMAGE_PIXELS == 10_000
    # twice the cap: Pillow's own guard fires inside Image.open; still a 413 naming the member
    with pytest.raises(UploadTooLarge, match=r"x.zip: a/1.png: image above the cap of 10,000"):
        scan_image_zip(_zip({"a/0.png": _png(100), "a/1.png": _png(300)}), "x.zip", limits=limits)
    scan_image_zip(_zip({"a/0.png": _png(100)}), "x.zip", limits=UploadLimits())  # the default cap again
    assert Image.MAX_IMAGE_PIXELS == 4096 * 4096


def test_image_count_limit(no_decoding):
    data = _zip({f"c{i % 3}/{i:02d}.png": _png() for i in range(12)})
    with pytest.raises(UploadTooLarge, match=r"12 images; at most 10 are allowed") as e:
        scan_image_zip(data, "many.zip", limits=UploadLimits(max_images=10))
    assert e.value.member == "c2/08.png"  # the 11th in sorted order (c0: 4, c1: 4, c2: 02 05 08 11)
    assert scan_image_zip(data, "many.zip", limits=UploadLimits(max_images=12)).summary()["images"] == 12


def test_header_reads_and_member_sizes_are_capped(no_decoding):
    """A JPEG with 6.5 MB of APP1 segments before its frame header (7 KB zipped): Pillow would read them all to
    find the size; the header pass stops at 4 MiB. A member declaring more bytes than any image at the pixel
    cap could take is refused from the zip's directory."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).save(buf, format="JPEG")
    jpg = buf.getvalue()
    app1 = b"".join(b"\xff\xe1" + (65535).to_bytes(2, "big") + bytes(65533) for _ in range(100))
    data = _zip({"c/x.jpg": jpg[:2] + app1 + jpg[2:]})
    assert len(data) < 20_000
    with pytest.raises(UploadTooLarge, match=r"c/x.jpg: the image's header .* runs past 4,194,304 bytes"):
        scan_image_zip(data, "app.zip")
    limits = UploadLimits(max_image_pixels=1000)  # at most 8 * 1000 + 1 MiB bytes per image file
    data = _zip({"c/0.png": _png(), "c/1.bmp": bytes(9000 + 1024 * 1024)})
    with pytest.raises(UploadTooLarge, match=r"c/1.bmp: 1,057,576 bytes uncompressed; an image file may have at "
                                             r"most 1,056,576"):
        scan_image_zip(data, "big.zip", limits=limits)


def test_every_listed_format_is_read_from_its_header(no_decoding):
    files = {}
    for ext, fmt, mode in (("png", "PNG", "L"), ("jpg", "JPEG", "L"), ("jpeg", "JPEG", "RGB"), ("bmp", "BMP", "L"),
                           ("gif", "GIF", "L"), ("pgm", "PPM", "L"), ("ppm", "PPM", "RGB")):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((20, 30), dtype=np.uint8)).convert(mode).save(buf, format=fmt)
        files[f"c/{ext}.{ext}"] = buf.getvalue()
    s = scan_image_zip(_zip(files), "f.zip").summary()
    assert s["images"] == 7 and s["image_shape"] == [20, 30] and s["pixels"] == 7 * 600


def test_defaults_accept_omniglots_background_set(no_decoding):
    """19,280 images of 105x105 in 964 classes of 20 (30 alphabets), as images_background.zip is laid out."""
    png = _png(105)
    files = {f"images_background/Alpha{c // 33}/character{c % 33:02d}/{i:02d}.png": png
             for c in range(964) for i in range(20)}
    data = _zip(files)
    scan = scan_image_zip(data, "images_background.zip", min_per_class=20)
    s = scan.summary()
    assert (s["images"], s["classes"], s["groups"], s["pixels"]) == (19_280, 964, 30, 212_562_000)
    assert s["image_shape"] == [105, 105]
    assert scan.estimated_bytes > 212_562_000


def test_structure_errors_from_headers(no_decoding):
    with pytest.raises(UploadError, match="not a zip file") as e:
        scan_image_zip(b"hello", "x.zip")
    assert e.value.status == 422
    with pytest.raises(UploadError, match=r"c/1.png: unreadable image"):
        scan_image_zip(_zip({"c/0.png": _png(), "c/1.png": b"not a png"}), "x.zip")
    with pytest.raises(UploadError, match=r"inconsistent image shapes: 9x8 here but 8x8 in c/0.png"):
        scan_image_zip(_zip({"c/0.png": _png(), "c/1.png": _png(size=(9, 8))}), "x.zip")
    with pytest.raises(UploadError, match=r"1 class\(es\) have fewer than 2 images"):
        scan_image_zip(_zip({"c/0.png": _png(), "d/0.png": _png(), "d/1.png": _png()}), "x.zip", min_per_class=2)


def test_only_the_listed_formats_are_opened(no_decoding):
    """A TIFF (or an EPS, which Pillow would hand to Ghostscript) named .png is not opened."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(buf, format="TIFF")
    with pytest.raises(UploadError, match=r"c/1.png: unreadable image \(UnidentifiedImageError"):
        scan_image_zip(_zip({"c/0.png": _png(), "c/1.png": buf.getvalue()}), "x.zip")


def test_corrupt_pixel_data_passes_the_headers_and_fails_decoding():
    """A PNG whose header is intact but whose pixel data is cut: the header pass accepts it (that is the
    worker's to find), the decoding validator names it."""
    from datasets.upload import validate_image_zip
    good = _png(32, 7)
    data = _zip({"c/0.png": good, "c/1.png": good[:60]})
    scan_image_zip(data, "cut.zip")
    with pytest.raises(UploadError, match=r"cut.zip: c/1.png: unreadable image"):
        validate_image_zip(data, "cut.zip")


def test_regression_limits_from_headers():
    n = 1000
    buf = io.BytesIO()
    np.savez_compressed(buf, task=np.zeros(n, dtype=np.int64), x=np.zeros((n, 3)), y=np.zeros(n))
    npz = buf.getvalue()
    assert scan_regression(npz, "p.npz").summary() == {"kind": "regression", "rows": n, "values": 4 * n}
    with pytest.raises(UploadTooLarge, match=r"'x' and 'y' hold 4,000 numbers; at most 3,999"):
        scan_regression(npz, "p.npz", UploadLimits(max_values=3999))
    buf = io.BytesIO()
    np.savez(buf, task=np.array([0, 0], dtype=object), x=np.zeros(2), y=np.zeros(2))
    with pytest.raises(UploadError, match=r"p.npz: task.npy: unreadable NPZ \(object arrays"):
        scan_regression(buf.getvalue(), "p.npz")
    buf = io.BytesIO()
    np.savez(buf, task=np.zeros(2), x=np.zeros(2))
    with pytest.raises(UploadError, match=r"missing array\(s\) \['y'\]"):
        scan_regression(buf.getvalue(), "p.npz")
    csv = b"task,x0,x1,y\n" + b"t,1,2,3\n" * 100
    assert scan_regression(csv, "p.csv").values == 300
    with pytest.raises(UploadTooLarge, match=r"100 rows of 3 numbers: 300 numbers; at most 299"):
        scan_regression(csv, "p.csv", UploadLimits(max_values=299))
    with pytest.raises(UploadError, match="no 'task' column"):
        scan_regression(b"x,y\n1,2\n", "p.csv")
    with pytest.raises(UploadError, match="empty file"):
        scan_regression(b"", "p.csv")


def test_the_api_side_stays_torch_free():
    """The API imports store.uploads, never the datasets package (whose __init__ imports core, i.e. torch)."""
    import subprocess
    code = ("import sys, store.uploads as u; u.scan_upload(b'task,x,y\\n0,1,2\\n', 'a.csv', 'regression'); "
            "print('torch' in sys.modules, 'datasets' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_unknown_kind():
    with pytest.raises(UploadError, match="unknown dataset kind"):
        scan_upload(b"", "a", "audio")


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
@pytest.mark.parametrize("trailing", [True, False])
def test_a_spooled_file_scans_as_its_bytes(tmp_path, newline, trailing):
    """The API reads an upload in place from the file it was spooled to, in 1 MiB chunks: the same scan as the
    bytes, also when a CRLF or the last line straddles a chunk boundary."""
    rows = [b"task,x,y"] + [b"%d,%d.25,%d.5" % (i % 7, i, i) for i in range(160_000)]  # ~2.4 MB
    data = newline.join(rows) + (newline if trailing else b"")
    path = tmp_path / "up.csv"
    path.write_bytes(data)
    with open(path, "rb") as f:
        from_file = scan_upload(f, "up.csv", "regression")
    assert from_file == scan_upload(data, "up.csv", "regression")
    assert from_file.rows == 160_000 and from_file.values == 320_000
    z = _zip({f"a/c{i}/{j}.png": _png(8) for i in range(3) for j in range(2)})
    (tmp_path / "up.zip").write_bytes(z)
    with open(tmp_path / "up.zip", "rb") as f:
        assert scan_upload(f, "up.zip", "image_classes").summary() == scan_upload(z, "up.zip", "image_classes").summary()
