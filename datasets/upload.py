"""Validation of user-uploaded meta-datasets, from bytes, without unpickling anything.

Two kinds:

- ``image_classes``: a zip of class folders, ``GROUP/CLASS/*.png`` or ``CLASS/*.png``; one top-level folder
  shared by every entry is skipped (so Omniglot's official zips validate as they are). Images are decoded
  with Pillow, converted to 8-bit grayscale and, by default (``invert="auto"``), inverted when the
  collection's mean is above mid-grey, so that strokes on a white background become high values (as the
  Omniglot reader does: strokes 255, background 0). -> :class:`ImageCollection`.
- ``regression``: a CSV with a header (a ``task`` column, input columns ``x`` or ``x0, x1, ...``, output
  columns ``y`` or ``y0, y1, ...``) or an NPZ (``np.load(allow_pickle=False)``) with arrays ``task`` [N],
  ``x`` [N] or [N, d_in] and ``y`` [N] or [N, d_out]. -> :class:`RegressionCollection`.

Every problem raises :class:`UploadError` whose message names the file (and the member inside a zip)
and the problem (:class:`UploadTooLarge`, HTTP 413, for the limits of the header pass in ``store.uploads``, which
runs first). Typical use by the datasets worker (``worker.dataset_tasks``; the API runs only the header pass)::

    coll = validate_image_zip(raw_bytes, "omniglot.zip", min_per_class=shots + query)
    coll.summary()          # counts, shapes, groups: the answer of POST/GET /v1/datasets
    coll.to_arrays()        # uint8 images [C, P, H, W], group ids, class names: what a job's loader returns
"""
from __future__ import annotations

import array
import csv
import io
import zipfile
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np

# the header pass (limits checked before anything is decoded) and the error types live in store.uploads, which
# the API imports without importing this package (whose __init__ imports core, i.e. torch)
from store.uploads import (PIL_FORMATS, UploadError, UploadLimits, csv_columns, scan_image_zip,
                           scan_regression)

MAX_IMAGE_PIXELS = UploadLimits.max_image_pixels
# decoded pixels over the whole archive, checked from each image's header before anything is decoded: bounds the
# memory an upload can take however well it compresses (Omniglot's background set, 19,280 images of 105x105,
# is 212M)
MAX_TOTAL_PIXELS = UploadLimits.max_total_pixels
MAX_CSV_FIELD = 1024  # characters in one CSV field (a number or a task name)
MAX_CSV_COLUMNS = 1024


# --------------------------------------------------------------------------- image classes
@dataclass
class ImageCollection:
    """Image classes: ``images[c]`` is a uint8 array [n_c, H, W]; ``keys[c] = (group, class)``."""

    keys: list
    images: list
    source: str = ""
    notes: list = field(default_factory=list)
    # how the images were turned into these arrays: {"decode_size": int or None, "invert": bool}; recorded in the
    # summary, from which a model trained on them derives its input preprocessing (store/preprocessing.py)
    preprocessing: Optional[dict] = None

    @property
    def groups(self) -> list:
        return sorted({g for g, _ in self.keys})

    def shape(self) -> tuple:
        return tuple(self.images[0].shape[1:]) if self.images else ()

    def per_class(self) -> int:
        return min(len(a) for a in self.images) if self.images else 0

    def to_arrays(self, per_class: Optional[int] = None) -> dict:
        """``{"images": uint8 [C, P, H, W], "groups": [int], "class_names": ["group/class"], "group_names"}``.

        Classes with more than ``per_class`` (default: the smallest class) images are truncated, in file order.
        """
        p = self.per_class() if per_class is None else per_class
        short = [f"{g}/{c}" for (g, c), a in zip(self.keys, self.images) if len(a) < p]
        if short:
            raise UploadError(self.source, f"classes {short[:5]} have fewer than {p} images")
        names = self.groups
        index = {g: i for i, g in enumerate(names)}
        return {"images": np.stack([a[:p] for a in self.images]), "groups": [index[g] for g, _ in self.keys],
                "class_names": [f"{g}/{c}" if g else c for g, c in self.keys], "group_names": names}

    def summary(self) -> dict:
        counts = [len(a) for a in self.images]
        per_group: dict = {}
        for g, _ in self.keys:
            per_group[g] = per_group.get(g, 0) + 1
        return {"kind": "image_classes", "classes": len(self.keys), "images": int(sum(counts)),
                "groups": len(per_group), "classes_per_group": per_group,
                "images_per_class": {"min": min(counts, default=0), "max": max(counts, default=0)},
                "image_shape": list(self.shape()), "notes": list(self.notes),
                **({"preprocessing": dict(self.preprocessing)} if self.preprocessing else {})}


def _decode(raw: bytes, file: str, member: str):
    """One image as uint8 grey levels (its size was checked from its header by the header pass)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw), formats=PIL_FORMATS) as im:
            im.load()
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except Exception as e:  # a hostile file can raise anything from a decoder: it is unreadable
        raise UploadError(file, f"unreadable image ({type(e).__name__}: {e})", member) from None


def _resize(a: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    if a.shape == (size, size):
        return a
    return np.asarray(Image.fromarray(a).resize((size, size), Image.BOX if size < min(a.shape) else Image.BILINEAR))


def validate_image_zip(data: bytes, name: str = "upload.zip", min_per_class: int = 1, min_classes: int = 1,
                       image_size: Optional[int] = None, invert="auto", max_total_pixels: Optional[int] = None,
                       limits: Optional[UploadLimits] = None) -> ImageCollection:
    """Validate and decode a zip of class folders; see the module docstring.

    ``min_per_class``: images every class needs (shots + query of the intended jobs). ``image_size``: resize
    every image to a square of this size while reading (then source shapes may differ); without it all
    images must share one shape. ``invert``: True, False or "auto" (invert when the mean pixel is > 127).
    ``limits`` (``store.uploads.UploadLimits``; ``max_total_pixels`` overrides its total): checked by the header
    pass (``store.uploads.scan_image_zip``) before any image is decoded.
    """
    limits = limits or UploadLimits()
    if max_total_pixels is not None:
        limits = replace(limits, max_total_pixels=max_total_pixels)
    scan = scan_image_zip(data, name, min_per_class, min_classes, image_size, limits)
    classes: dict = {}
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for key, info in scan.entries:
            try:
                raw = zf.read(info)
            except Exception as e:  # a corrupt stream or a CRC mismatch
                raise UploadError(name, f"unreadable image ({type(e).__name__}: {e})", info.filename) from None
            a = _decode(raw, name, info.filename)
            if image_size is not None:
                a = _resize(a, int(image_size))
            classes.setdefault(key, []).append((info.filename, a))
    shapes = {}
    for items in classes.values():
        for member, a in items:
            shapes.setdefault(a.shape, member)
    if len(shapes) > 1:
        (s0, m0), (s1, m1) = list(shapes.items())[:2]
        raise UploadError(name, f"inconsistent image shapes: {s1[1]}x{s1[0]} here but {s0[1]}x{s0[0]} in {m0} "
                          f"(set image_size to resize)", m1)
    small = [f"{g}/{c}" if g else c for (g, c), items in classes.items() if len(items) < min_per_class]
    if small:
        raise UploadError(name, f"{len(small)} class(es) have fewer than {min_per_class} images: {small[:5]}")
    if len(classes) < min_classes:
        raise UploadError(name, f"{len(classes)} classes; at least {min_classes} are needed")
    keys = sorted(classes)
    images = [np.stack([a for _, a in classes[k]]) for k in keys]
    notes = []
    do_invert = invert
    if invert == "auto":
        mean = float(np.mean([a.mean() for a in images]))
        do_invert = mean > 127.5
        if do_invert:
            notes.append(f"inverted (mean pixel {mean:.0f} > 127): dark strokes on light background become high values")
    if do_invert:
        images = [255 - a for a in images]
    counts = {len(a) for a in images}
    if len(counts) > 1:
        notes.append(f"classes have {min(counts)}..{max(counts)} images; jobs use the first {min(counts)} of each")
    return ImageCollection(keys, images, name, notes, {"decode_size": None if image_size is None else int(image_size),
                                                       "invert": bool(do_invert)})


def combine_image_collections(collections: Sequence[ImageCollection]) -> ImageCollection:
    """Union of several collections; a class with the same group/class path in two of them counts once
    (the first one's images are kept), as Greek and Latin do in Omniglot's two minimal zips."""
    seen: dict = {}
    notes = []
    for coll in collections:
        for k, a in zip(coll.keys, coll.images):
            if k in seen:
                continue
            seen[k] = a
        notes += coll.notes
    shapes = {a.shape[1:] for a in seen.values()}
    if len(shapes) > 1:
        raise UploadError(", ".join(c.source for c in collections), f"collections have different image shapes {sorted(shapes)}")
    keys = sorted(seen)
    dup = sum(len(c.keys) for c in collections) - len(keys)
    if dup:
        notes.append(f"{dup} duplicate class path(s) counted once")
    pres = [c.preprocessing for c in collections]
    return ImageCollection(keys, [seen[k] for k in keys], "+".join(c.source for c in collections), notes,
                           pres[0] if pres and all(p == pres[0] for p in pres) else None)


# --------------------------------------------------------------------------- regression points
@dataclass
class RegressionCollection:
    """Per-task regression points: ``tasks[i] = (task_id, x [N_i, d_in], y [N_i, d_out])`` (float64)."""

    tasks: list
    source: str = ""

    def to_data(self) -> dict:
        """What a ``regression_dataset`` loader returns: ``{"tasks": [(x, y), ...], "task_ids": [...]}``."""
        return {"tasks": [(x, y) for _, x, y in self.tasks], "task_ids": [t for t, _, _ in self.tasks]}

    def summary(self) -> dict:
        n = [len(x) for _, x, _ in self.tasks]
        return {"kind": "regression", "tasks": len(self.tasks), "points": int(sum(n)),
                "points_per_task": {"min": min(n, default=0), "max": max(n, default=0)},
                "input_dim": int(self.tasks[0][1].shape[1]) if self.tasks else 0,
                "output_dim": int(self.tasks[0][2].shape[1]) if self.tasks else 0}


def _read_csv(data: bytes, name: str):
    """Streamed: the header row first, then each row straight into float64 buffers (a row list of strings
    would take ~60 bytes per field)."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UploadError(name, f"not UTF-8 text ({e})") from None
    reader = csv.reader(io.StringIO(text))
    xs, ys, tasks = array.array("d"), array.array("d"), []
    header = None
    try:
        for row in reader:
            if len(row) > MAX_CSV_COLUMNS:
                raise UploadError(name, f"line {reader.line_num}: {len(row)} fields; at most {MAX_CSV_COLUMNS}")
            if any(len(c) > MAX_CSV_FIELD for c in row):
                raise UploadError(name, f"line {reader.line_num}: a field longer than {MAX_CSV_FIELD} characters")
            if header is None:
                header = [h.strip() for h in row]
                ti, xi, yi = csv_columns(header, name)
                continue
            if not row or all(not c.strip() for c in row):
                continue
            line = reader.line_num
            if len(row) != len(header):
                raise UploadError(name, f"line {line}: {len(row)} fields, the header has {len(header)}")
            try:
                xs.extend([float(row[i]) for i in xi])
                ys.extend([float(row[i]) for i in yi])
            except ValueError as e:
                raise UploadError(name, f"line {line}: not a number ({e})") from None
            tasks.append(row[ti].strip())
    except csv.Error as e:  # e.g. a quoted field longer than the csv module's limit, a NUL byte
        raise UploadError(name, f"line {reader.line_num}: {e}") from None
    if header is None:
        raise UploadError(name, "empty file")
    if not tasks:
        raise UploadError(name, "no data rows")
    del text
    n = len(tasks)
    return (np.array(tasks), np.frombuffer(xs, dtype=np.float64).reshape(n, len(xi)).copy(),
            np.frombuffer(ys, dtype=np.float64).reshape(n, len(yi)).copy())


def _read_npz(data: bytes, name: str):
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            missing = [k for k in ("task", "x", "y") if k not in z.files]
            if missing:
                raise UploadError(name, f"missing array(s) {missing}; found {z.files}")
            task, x, y = z["task"], z["x"], z["y"]
    except UploadError:
        raise
    except ValueError as e:  # object arrays need pickling: refused
        raise UploadError(name, f"unreadable NPZ ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise UploadError(name, f"not an NPZ file ({e})") from None
    if task.ndim != 1:
        raise UploadError(name, f"'task' must be 1-D, got shape {task.shape}")
    x = x.reshape(len(x), -1) if x.ndim <= 2 else None
    y = y.reshape(len(y), -1) if y.ndim <= 2 else None
    if x is None or y is None:
        raise UploadError(name, "'x' and 'y' must be [N] or [N, d]")
    if not (len(task) == len(x) == len(y)):
        raise UploadError(name, f"inconsistent lengths: task {len(task)}, x {len(x)}, y {len(y)}")
    for k, a in (("x", x), ("y", y)):
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise UploadError(name, f"'{k}' must be real numbers, got dtype {a.dtype}")
    if not (np.issubdtype(task.dtype, np.integer) or task.dtype.kind in "US"):
        raise UploadError(name, f"'task' must be integers or strings, got dtype {task.dtype}")
    return task, x.astype(np.float64), y.astype(np.float64)


def validate_regression(data: bytes, name: str = "upload.csv", min_points: int = 2,
                        limits: Optional[UploadLimits] = None) -> RegressionCollection:
    """Validate a CSV or NPZ of regression points (format by the NPZ/zip magic, else CSV).

    ``min_points``: points every task needs (shots + query of the intended jobs). ``limits``: the numbers
    allowed (``max_values``), checked by the header pass (``store.uploads.scan_regression``) before parsing.
    """
    scan_regression(data, name, limits)
    task, x, y = (_read_npz if data[:2] == b"PK" else _read_csv)(data, name)
    for k, a in (("x", x), ("y", y)):
        bad = ~np.isfinite(a).all(axis=1)
        if bad.any():
            i = int(np.argmax(bad))
            raise UploadError(name, f"{int(bad.sum())} row(s) with NaN/Inf in {k!r}; first at row {i} (task {task[i].item()!r})")
    ids, inverse = np.unique(task, return_inverse=True)
    tasks = []
    for j, t in enumerate(ids.tolist()):
        m = inverse == j
        tasks.append((t, x[m], y[m]))
    small = [(t, len(a)) for t, a, _ in tasks if len(a) < min_points]
    if small:
        raise UploadError(name, f"{len(small)} task(s) have fewer than {min_points} points, e.g. "
                          + ", ".join(f"task {t!r}: {n}" for t, n in small[:5]))
    return RegressionCollection(tasks, name)


def validate_upload(data: bytes, name: str, kind: str, **kw):
    """Dispatch on ``kind`` ("image_classes" or "regression"); returns the collection."""
    if kind == "image_classes":
        return validate_image_zip(data, name, **kw)
    if kind == "regression":
        return validate_regression(data, name, **kw)
    raise UploadError(name, f"unknown dataset kind {kind!r}; expected 'image_classes' or 'regression'")
