"""The header pass over an uploaded meta-dataset: every limit checked from headers, before anything is decoded.

``POST /v1/datasets`` runs :func:`scan_upload` in the API process on the raw bytes, then stores them and leaves
the decoding to a worker (``worker.dataset_tasks``); the decoding validators (``datasets.upload``) run the same
pass first, so whoever calls them gets the same limits. Nothing here decodes pixel data or parses numbers:

- ``image_classes`` (a zip of class folders): the zip's central directory (entry count, declared sizes, folder
  layout, images per class) and each image's header, read by ``PIL.Image.open`` from the member's first bytes
  (at most ``MAX_IMAGE_HEADER``) without ``load()``: width x height against ``max_image_pixels`` per image and
  ``max_total_pixels`` over the archive, counted in sorted member order, so the error names the member that
  crosses the limit; image shapes agree; ``max_images`` images, each member at most ``max_image_file`` bytes
  uncompressed. Only the formats of ``IMAGE_EXTENSIONS`` are opened (Pillow would otherwise identify, e.g., an
  EPS or a TIFF named ``.png``), and Pillow's own guard, ``Image.MAX_IMAGE_PIXELS``, is set to
  ``max_image_pixels``.
- ``regression``: an NPZ's arrays from their ``.npy`` headers (names, shapes, dtypes; no object arrays); a CSV's
  header row and its line count; numbers (``x`` and ``y`` values) against ``max_values``.

Limits that an upload exceeds raise :class:`UploadTooLarge` (HTTP 413); anything malformed :class:`UploadError`
(422). Both name the file and, inside an archive, the member. This module is torch-free on purpose: importing
the ``datasets`` package imports ``core`` (and torch, ~200 MB), which the API process never does.
"""
from __future__ import annotations

import io
import math
import re
import zipfile
from dataclasses import dataclass, field
from typing import BinaryIO, Optional

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm")
PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "PPM")  # the Pillow plugins of IMAGE_EXTENSIONS (.pgm is PPM's)
MAX_FILES = 200_000
MAX_UNCOMPRESSED = 2 * 1024 ** 3
MAX_CSV_HEADER = 1024 * 1024  # bytes in a CSV's header row
MAX_IMAGE_HEADER = 4 * 1024 * 1024  # bytes of a member the header pass reads (a PNG's text chunks, a JPEG's APPn
# segments come before the size; real files need kilobytes, a crafted one could make Pillow read them all)


def max_image_file(limits: "UploadLimits") -> int:
    """Uncompressed bytes of one image member: raw 16-bit RGBA (8 bytes per pixel, BMP/PPM store pixels
    uncompressed) at the per-image cap, plus 1 MiB. Bounds what the decoding worker reads per member."""
    return 8 * limits.max_image_pixels + 1024 * 1024


class UploadError(ValueError):
    """A problem with an uploaded file: ``file`` (and ``member`` inside an archive) and ``problem``. ``status``:
    the HTTP status the API answers with (422: malformed)."""

    status = 422

    def __init__(self, file: str, problem: str, member: Optional[str] = None):
        self.file, self.problem, self.member = file, problem, member
        where = f"{file}: {member}" if member else file
        super().__init__(f"{where}: {problem}")


class UploadTooLarge(UploadError):
    """The upload exceeds a limit (images, pixels, values, declared sizes): 413."""

    status = 413


@dataclass(frozen=True)
class UploadLimits:
    """What one upload may decode to. The defaults accept Omniglot's whole background set (19,280 images of
    105x105: 212,562,000 pixels) and are the service's defaults (``METASHRINK_DATASET_MAX_*``)."""

    max_images: int = 100_000
    max_image_pixels: int = 4096 * 4096
    max_total_pixels: int = 256 * 1024 ** 2
    max_values: int = 32 * 1024 ** 2  # regression numbers (x and y entries): 256 MiB as float64

    @classmethod
    def from_settings(cls, s) -> "UploadLimits":
        return cls(max_images=s.dataset_max_images, max_image_pixels=s.dataset_max_image_pixels,
                   max_total_pixels=s.dataset_max_pixels, max_values=s.dataset_max_values)


def configure_pillow(limits: UploadLimits) -> None:
    """Pillow's decompression-bomb guard at our per-image cap (it warns above it and refuses twice it); the
    header pass refuses above it first, this is the second line for anything decoded later in the process."""
    from PIL import Image
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels


# --------------------------------------------------------------------------- image classes
@dataclass
class ImageScan:
    """What the headers say: ``entries`` [(key, ZipInfo)] in decoding (sorted member) order, ``key`` =
    (group, class); ``sizes[member] = (width, height)``."""

    name: str
    entries: list
    sizes: dict
    pixels: int
    notes: list = field(default_factory=list)

    @property
    def estimated_bytes(self) -> int:
        """The stored collection's size: one grey byte per pixel, a count per class, a small header."""
        classes = {k for k, _ in self.entries}
        return self.pixels + 80 * len(classes) + 4096

    def summary(self) -> dict:
        per_group: dict = {}
        counts: dict = {}
        for key, _ in self.entries:
            counts[key] = counts.get(key, 0) + 1
        for g, _ in counts:
            per_group[g] = per_group.get(g, 0) + 1
        shapes = {(h, w) for w, h in self.sizes.values()}
        return {"kind": "image_classes", "classes": len(counts), "images": len(self.entries),
                "groups": len(per_group), "pixels": self.pixels,
                "image_shape": list(next(iter(shapes))) if len(shapes) == 1 else None}


def image_entries(zf: zipfile.ZipFile, name: str, limits: UploadLimits) -> list:
    """The image members as [(path parts without a shared top folder, ZipInfo)], checking the entry count,
    the declared sizes and the folder layout."""
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if len(infos) > MAX_FILES:
        raise UploadTooLarge(name, f"{len(infos)} files; at most {MAX_FILES} are allowed")
    if sum(i.file_size for i in infos) > MAX_UNCOMPRESSED:
        raise UploadTooLarge(name, "uncompressed size exceeds the limit")
    entries = []
    for i in infos:
        path = i.filename.replace("\\", "/")
        parts = [p for p in path.split("/") if p]
        if any(p.startswith(".") or p == "__MACOSX" for p in parts) or ".." in parts:
            continue  # hidden files, macOS resource forks
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            continue
        if i.file_size > max_image_file(limits):
            raise UploadTooLarge(name, f"{i.file_size:,} bytes uncompressed; an image file may have at most "
                                 f"{max_image_file(limits):,}", i.filename)
        entries.append((parts, i))
    if not entries:
        raise UploadError(name, f"no images ({', '.join(IMAGE_EXTENSIONS)}) in the archive")
    entries.sort(key=lambda e: e[1].filename)
    if len(entries) > limits.max_images:
        raise UploadTooLarge(name, f"{len(entries):,} images; at most {limits.max_images:,} are allowed (the "
                             f"first one over is this member)", entries[limits.max_images][1].filename)
    tops = {p[0] for p, _ in entries}
    if len(tops) == 1 and all(len(p) >= 3 for p, _ in entries):
        entries = [(p[1:], i) for p, i in entries]  # a single top-level folder is skipped
    depths = {len(p) for p, _ in entries}
    if depths - {2, 3} or len(depths) != 1:
        bad = next(i.filename for p, i in entries if len(p) != max(depths) or len(p) not in (2, 3))
        raise UploadError(name, "expected GROUP/CLASS/image or CLASS/image for every image (mixed or other "
                          "depths found)", bad)
    return entries


class HeaderTooLong(OSError):
    pass


class _HeaderReader(io.RawIOBase):
    """A member's stream that ends, with an error, ``cap`` bytes in: what the header pass may read of it."""

    def __init__(self, fp, cap: int):
        self.fp, self.cap = fp, cap

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.fp.tell()

    def seek(self, offset, whence=io.SEEK_SET):
        if whence == io.SEEK_END:
            raise OSError("the header pass does not seek from the end")  # none of PIL_FORMATS does
        target = offset if whence == io.SEEK_SET else self.fp.tell() + offset
        if target > self.cap:
            raise HeaderTooLong()
        return self.fp.seek(target)

    def readinto(self, b):
        if self.fp.tell() + len(b) > self.cap:
            raise HeaderTooLong()
        data = self.fp.read(len(b))
        b[:len(data)] = data
        return len(data)


def header_size(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: UploadLimits) -> tuple:
    """(width, height) from the member's header: ``Image.open`` reads the first bytes of the member (the zip
    stream is decompressed only that far), never the pixel data."""
    from PIL import Image

    try:
        with zf.open(info) as fp, Image.open(_HeaderReader(fp, MAX_IMAGE_HEADER), formats=PIL_FORMATS) as im:
            return im.size
    except HeaderTooLong:
        raise UploadTooLarge(name, f"the image's header (metadata before the pixel data) runs past "
                             f"{MAX_IMAGE_HEADER:,} bytes", info.filename) from None
    except Image.DecompressionBombError as e:  # Pillow's own guard (twice our cap), before our check could run
        raise UploadTooLarge(name, f"image above the cap of {limits.max_image_pixels:,} pixels per image ({e})",
                             info.filename) from None
    except Exception as e:  # anything a hostile member can raise: not an image, encrypted, unknown compression
        raise UploadError(name, f"unreadable image ({type(e).__name__}: {e})", info.filename) from None


def _file(data) -> BinaryIO:
    """An upload as a seekable binary file: bytes, or the file the API spooled the upload to (read in place)."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(data)
    data.seek(0)
    return data


def scan_image_zip(data, name: str = "upload.zip", min_per_class: int = 1, min_classes: int = 1,
                   image_size: Optional[int] = None, limits: Optional[UploadLimits] = None) -> ImageScan:
    """The header pass over a zip of class folders (see the module docstring). ``image_size``: images will be
    resized to this square, so their shapes need not agree."""
    limits = limits or UploadLimits()
    configure_pillow(limits)
    try:
        zf = zipfile.ZipFile(_file(data))
    except zipfile.BadZipFile as e:
        raise UploadError(name, f"not a zip file ({e})") from None
    with zf:
        entries = image_entries(zf, name, limits)
        sizes, pixels, keyed = {}, 0, []
        for parts, info in entries:
            w, h = header_size(zf, info, name, limits)
            if w * h > limits.max_image_pixels:
                raise UploadTooLarge(name, f"image of {w}x{h} pixels is above the cap of "
                                     f"{limits.max_image_pixels:,} pixels per image", info.filename)
            pixels += w * h
            if pixels > limits.max_total_pixels:
                raise UploadTooLarge(name, f"the archive's images decode to more than {limits.max_total_pixels:,} "
                                     f"pixels in all (reached at this member)", info.filename)
            sizes[info.filename] = (w, h)
            keyed.append(((parts[0], parts[1]) if len(parts) == 3 else ("", parts[0]), info))
    if image_size is None:
        first: dict = {}
        for member, (w, h) in sizes.items():
            first.setdefault((h, w), member)
        if len(first) > 1:
            (s0, m0), (s1, m1) = list(first.items())[:2]
            raise UploadError(name, f"inconsistent image shapes: {s1[1]}x{s1[0]} here but {s0[1]}x{s0[0]} in {m0} "
                              f"(set image_size to resize)", m1)
    counts: dict = {}
    for key, _ in keyed:
        counts[key] = counts.get(key, 0) + 1
    small = [f"{g}/{c}" if g else c for (g, c), n in counts.items() if n < min_per_class]
    if small:
        raise UploadError(name, f"{len(small)} class(es) have fewer than {min_per_class} images: {small[:5]}")
    if len(counts) < min_classes:
        raise UploadError(name, f"{len(counts)} classes; at least {min_classes} are needed")
    if image_size is not None:
        pixels = len(keyed) * int(image_size) ** 2  # what is stored
    return ImageScan(name, keyed, sizes, pixels)


# --------------------------------------------------------------------------- regression points
@dataclass
class RegressionScan:
    name: str
    values: int  # x and y numbers
    rows: int

    @property
    def estimated_bytes(self) -> int:
        """float64 x and y, a count per task (at most one per row), a small header."""
        return 8 * self.values + 8 * self.rows + 1024

    def summary(self) -> dict:
        return {"kind": "regression", "rows": self.rows, "values": self.values}


def _npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    import numpy as np

    with zf.open(info) as f:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unsupported .npy version {version}")
        shape, _, dtype = read(f, max_header_size=10_000)
    return shape, dtype


def _scan_npz(data, name: str, limits: UploadLimits) -> RegressionScan:
    try:
        zf = zipfile.ZipFile(_file(data))
    except zipfile.BadZipFile as e:
        raise UploadError(name, f"not an NPZ file ({e})") from None
    with zf:
        if sum(i.file_size for i in zf.infolist()) > MAX_UNCOMPRESSED:
            raise UploadTooLarge(name, "uncompressed size exceeds the limit")
        arrays = {i.filename[:-4]: i for i in zf.infolist() if i.filename.endswith(".npy")}
        missing = [k for k in ("task", "x", "y") if k not in arrays]
        if missing:
            raise UploadError(name, f"missing array(s) {missing}; found {sorted(arrays)}")
        shapes = {}
        for k in ("task", "x", "y"):
            try:
                shape, dtype = _npy_header(zf, arrays[k])
            except Exception as e:
                raise UploadError(name, f"unreadable NPZ ({type(e).__name__}: {e})", arrays[k].filename) from None
            if dtype.hasobject:
                raise UploadError(name, "unreadable NPZ (object arrays cannot be loaded when allow_pickle=False)",
                                  arrays[k].filename)
            shapes[k] = shape
    values = math.prod(shapes["x"]) + math.prod(shapes["y"])
    if values > limits.max_values:
        raise UploadTooLarge(name, f"'x' and 'y' hold {values:,} numbers; at most {limits.max_values:,} are allowed")
    return RegressionScan(name, values, int(shapes["task"][0]) if shapes["task"] else 1)


def csv_columns(header: list, name: str) -> tuple:
    """The header row's columns: (task index, x indices, y indices), or UploadError."""
    if "task" not in header:
        raise UploadError(name, f"no 'task' column in the header {header}")
    xc, yc = _columns(header, "x"), _columns(header, "y")
    if not xc or not yc:
        raise UploadError(name, f"need input columns x or x0, x1, ... and output columns y or y0, y1, ...; "
                          f"header is {header}")
    return header.index("task"), [header.index(c) for c in xc], [header.index(c) for c in yc]


def _columns(header: list, prefix: str) -> list:
    cols = [h for h in header if h == prefix or (h.startswith(prefix) and h[len(prefix):].isdigit())]
    return sorted(cols, key=lambda h: -1 if h == prefix else int(h[len(prefix):]))


def _scan_csv(data, name: str, limits: UploadLimits) -> RegressionScan:
    """The header row (its columns, as the decoding pass reads them) and the line count: the numbers a CSV holds
    at most (a quoted field spanning lines only lowers the real count). Read in 1 MiB chunks."""
    import csv

    f = _file(data)
    head = f.read(MAX_CSV_HEADER + 1)
    m = re.search(rb"[\r\n]", head)
    if m is None and len(head) > MAX_CSV_HEADER:
        raise UploadError(name, f"line 1: longer than {MAX_CSV_HEADER:,} bytes")
    first = head if m is None else head[:m.start()]
    try:
        text = first.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UploadError(name, f"not UTF-8 text ({e})") from None
    if m is None and not text:
        raise UploadError(name, "empty file")
    try:
        row = next(csv.reader([text]), [])
    except csv.Error as e:
        raise UploadError(name, f"line 1: {e}") from None
    _, xi, yi = csv_columns([h.strip() for h in row], name)
    n_lf, n_cr, last, chunk = head.count(b"\n"), head.count(b"\r"), head[-1:], f.read(1 << 20)
    while chunk:
        n_lf, n_cr, last = n_lf + chunk.count(b"\n"), n_cr + chunk.count(b"\r"), chunk[-1:]
        chunk = f.read(1 << 20)
    rows = max(max(n_lf, n_cr) + (0 if last in (b"\n", b"\r") else 1) - 1, 0)
    values = rows * (len(xi) + len(yi))
    if values > limits.max_values:
        raise UploadTooLarge(name, f"{rows:,} rows of {len(xi) + len(yi)} numbers: {values:,} numbers; at most "
                             f"{limits.max_values:,} are allowed")
    return RegressionScan(name, values, rows)


def scan_regression(data, name: str = "upload.csv", limits: Optional[UploadLimits] = None) -> RegressionScan:
    """The header pass over a CSV or NPZ of regression points (format by the NPZ/zip magic, else CSV); ``data``:
    bytes or a seekable binary file."""
    limits = limits or UploadLimits()
    magic = _file(data).read(2)
    return (_scan_npz if magic == b"PK" else _scan_csv)(data, name, limits)


def scan_upload(data, name: str, kind: str, limits: Optional[UploadLimits] = None, **opts):
    """Dispatch on ``kind``: the header pass of an upload (bytes, or a seekable binary file read in place), or
    UploadError / UploadTooLarge. ``opts``:
    ``min_per_class`` (image_classes); ``min_points`` is checked by the decoding pass only."""
    if kind == "image_classes":
        return scan_image_zip(data, name, min_per_class=opts.get("min_per_class", 1), limits=limits)
    if kind == "regression":
        return scan_regression(data, name, limits)
    raise UploadError(name, f"unknown dataset kind {kind!r}; expected 'image_classes' or 'regression'")
