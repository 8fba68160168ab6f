"""Image files as adapt and predict inputs: the ``multipart/form-data`` alternative of the JSON bodies.

``POST /v1/models/{id}/adapt``: ``support`` files with ``labels`` (one per support file, in the same order: repeated
fields or one field holding a JSON list), ``query`` files, and optionally ``steps``, ``modules``, ``save_adapter``.
``POST /v1/adapters/{id}/predict``: ``x`` files. The answers are those of the JSON bodies.

Bounded like the JSON path, and torch-free (the API process never imports torch): the body cap (413) before the
form is parsed, the rows cap on the number of files, then every image's header is read (``Image.open`` reads no
pixel data): pixels per image and ``adapt_max_pixels`` over the request, and the size when the model resizes
nothing. The files' bytes then travel to the adapt worker with the model's preprocessing
(``store.preprocessing``), where ``datasets.images.payload_inputs`` applies it with the training code itself and
hands the model the arrays a JSON request would have carried. A problem with a file is a 422 naming it
(``loc`` [field, index]; the detail names the file).
"""
from __future__ import annotations

import json
import re

from fastapi import Request
from pydantic import ValidationError

from store.settings import Settings

from .bodies import read_capped
from .errors import ApiError, pydantic_errors, unprocessable

FILES = {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1}
_IMAGES = ("image files (PNG, JPEG, BMP, GIF, PGM/PPM; multipart file parts with a filename), preprocessed as the "
           "model's training data was (GET /v1/models/{id}: preprocessing)")
ADAPT_FORM = {"type": "object", "required": ["support", "labels", "query"], "properties": {
    "support": {**FILES, "description": f"the support set: {_IMAGES}"},
    "labels": {"type": "array", "items": {"type": "integer"}, "minItems": 1,
               "description": "one class label per support file, in the same order: the field repeated, or one "
                              "field holding a JSON list"},
    "query": {**FILES, "description": f"the query set: {_IMAGES}"},
    "steps": {"type": "integer", "minimum": 0, "default": 100},
    "modules": {"type": "string", "default": "selected",
                "description": "selected, all, a module name (the field repeated for several) or a JSON list"},
    "save_adapter": {"type": "boolean", "default": False}}}
PREDICT_FORM = {"type": "object", "required": ["x"], "properties": {"x": {**FILES, "description": _IMAGES}}}

ADAPT_FIELDS = set(ADAPT_FORM["properties"])
PREDICT_FIELDS = set(PREDICT_FORM["properties"])


def is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").lower().startswith("multipart/form-data")


async def read_form(request: Request, settings: Settings):
    """The capped body (413) parsed as a multipart form; at most ``adapt_max_rows`` files per image field."""
    raw = await read_capped(request, settings.adapt_max_bytes)
    request._body = raw  # starlette's form parser reads the cached body
    rows = settings.adapt_max_rows
    try:
        return await request.form(max_files=2 * rows, max_fields=rows + 16)
    except Exception as e:
        msg = getattr(e, "detail", None) or str(e)
        if "Too many files" in msg:
            msg = f"more than {2 * rows} files: the support and query sets hold at most {rows} images each"
        raise ApiError(422, f"not a readable multipart form: {msg}", [{"loc": ["body"], "msg": msg}]) from None


def image_spec(app, m) -> dict:
    """The model's preprocessing, or 422 saying why image files cannot be taken."""
    from store.preprocessing import of_model

    with app.state.db.session() as s:
        spec, why = of_model(s, m)
    if spec is None:
        raise ApiError(422, f"this model takes no image files: {why}; send the inputs as JSON arrays "
                            f"(application/json)", [{"loc": ["body"], "msg": why}])
    return spec


def _check_fields(form, allowed: set) -> None:
    extra = sorted(set(form.keys()) - allowed)
    if extra:
        raise unprocessable([extra[0]], f"unknown field; this form takes {sorted(allowed)}")


def _files(form, field: str, rows: int) -> list:
    items = form.getlist(field)
    for i, v in enumerate(items):
        if isinstance(v, str):
            raise unprocessable([field, i], "must be an image file (a multipart file part with a filename)")
    if not items:
        raise unprocessable([field], "at least one image file is required")
    if len(items) > rows:
        raise unprocessable([field], f"{len(items)} files is above the cap of {rows} rows")
    return [(v.filename or f"{field}[{i}]", v.file.read()) for i, v in enumerate(items)]


def _one(form, field: str):
    vals = form.getlist(field)
    if not vals:
        return None
    if len(vals) > 1 or not isinstance(vals[0], str):
        raise unprocessable([field], "must be given once, as a text field")
    return vals[0].strip()


def _json(text: str, field: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise unprocessable([field], "nested too deeply") from None
    except ValueError as e:
        raise unprocessable([field], f"not valid JSON: {e}") from None


def _labels(form, n: int) -> list:
    vals = form.getlist("labels")
    if any(not isinstance(v, str) for v in vals):
        raise unprocessable(["labels"], "must be text fields, not files")
    if len(vals) == 1 and vals[0].strip().startswith("["):
        labels = _json(vals[0], "labels")
    else:
        labels = []
        for i, v in enumerate(vals):
            if not re.fullmatch(r"\s*[+-]?[0-9]{1,18}\s*", v):
                raise unprocessable(["labels", i], f"{v[:40]!r} is not an integer class label")
            labels.append(int(v))
    if not isinstance(labels, list) or len(labels) != n:
        got = len(labels) if isinstance(labels, list) else "no list of"
        raise unprocessable(["labels"], f"{got} labels for {n} support files: one label per support file, in the "
                                        f"same order")
    return labels


def _modules(form):
    vals = form.getlist("modules")
    if any(not isinstance(v, str) for v in vals):
        raise unprocessable(["modules"], "must be text fields, not files")
    if not vals:
        return None
    if len(vals) > 1:
        return [v.strip() for v in vals]
    v = vals[0].strip()
    if v.startswith("["):
        names = _json(v, "modules")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise unprocessable(["modules"], "a JSON list of module names (strings)")
        return names
    return v if v in ("selected", "all") else [v]


MAX_IMAGE_PIXELS = 4096 * 4096  # per image, as uploads
PIL_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "PPM")  # what uploads open (.pgm is PPM's plugin)


def _file_error(field: str, i: int, name: str, problem: str) -> ApiError:
    return ApiError(422, f"{field}[{i}] {name}: {problem}", [{"loc": [field, i], "msg": problem, "file": name}])


def check_headers(settings: Settings, spec: dict, groups: dict) -> None:
    """Each file's header, before anything is decoded: a readable image of an accepted format, at most
    ``MAX_IMAGE_PIXELS``, ``adapt_max_pixels`` over the request (in field order), and the training size when
    the model's preprocessing resizes nothing."""
    import io

    from PIL import Image

    left = settings.adapt_max_pixels
    fixed = None if (spec.get("size") or spec.get("decode_size")) else tuple(spec["input_shape"][1:])
    for field, files in groups.items():
        for i, (name, raw) in enumerate(files):
            try:
                with Image.open(io.BytesIO(raw), formats=PIL_FORMATS) as im:
                    w, h = im.size
            except Image.DecompressionBombError:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
                raise _file_error(field, i, name, f"image above the cap of {MAX_IMAGE_PIXELS:,} pixels per "
                                                  f"image") from None
            except Exception as e:  # anything a hostile file can raise: not an image
                raise _file_error(field, i, name, f"unreadable image ({type(e).__name__}: {e})") from None
            if w * h > MAX_IMAGE_PIXELS:
                raise _file_error(field, i, name, f"image of {w}x{h} pixels is above the cap of "
                                                  f"{MAX_IMAGE_PIXELS:,} pixels per image")
            left -= w * h
            if left < 0:
                raise _file_error(field, i, name, f"the request's images decode to more than "
                                                  f"{settings.adapt_max_pixels:,} pixels in all (reached at this file)")
            if fixed is not None and (h, w) != fixed:
                raise _file_error(field, i, name, f"image of {w}x{h} pixels; this model takes {fixed[1]}x{fixed[0]} "
                                                  f"images (its training resized none)")


def pack_files(files) -> dict:
    """Image files for the Celery payload: their bytes one after the other as one uint8 array (``worker.wire``
    sends it as base64), their sizes and names (read back by ``datasets.images.unpack_files``)."""
    import numpy as np
    return {"blob": np.frombuffer(b"".join(raw for _, raw in files), dtype=np.uint8),
            "sizes": [len(raw) for _, raw in files], "names": [name for name, _ in files]}


def _validated(schema, body: dict):
    try:
        return schema.model_validate(body, strict=True)
    except ValidationError as e:
        errs = pydantic_errors(e)
        raise ApiError(422, "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs), errs) from None


def adapt_payload(app, m, form) -> dict:
    """A multipart adapt form -> the adapt payload (runs in a worker thread of the API): checked as the JSON
    request would be, the files' headers checked, the files packed with the model's preprocessing."""
    from schemas.api import AdaptRequest

    from .validation import as_array, check_adapt_cost, check_targets, model_shape, validate_options

    settings: Settings = app.state.settings
    _check_fields(form, ADAPT_FIELDS)
    spec = image_spec(app, m)
    rows = settings.adapt_max_rows
    support, query = _files(form, "support", rows), _files(form, "query", rows)
    labels = _labels(form, len(support))
    body: dict = {"support": {"x": [], "y": []}, "query": {"x": []}}
    steps, save = _one(form, "steps"), _one(form, "save_adapter")
    if steps is not None:  # form fields are text: parsed here, then validated strictly as the JSON body is
        if not re.fullmatch(r"[+-]?[0-9]{1,18}", steps):
            raise unprocessable(["steps"], f"{steps[:40]!r} is not an integer")
        body["steps"] = int(steps)
    if save is not None:
        if save.lower() not in ("true", "false", "1", "0"):
            raise unprocessable(["save_adapter"], f"{save[:40]!r} is not a boolean (true or false)")
        body["save_adapter"] = save.lower() in ("true", "1")
    modules = _modules(form)
    if modules is not None:
        body["modules"] = modules
    req = _validated(AdaptRequest, body)
    validate_options(req, m, settings)
    ys = check_targets(as_array(labels, "labels", integer=m.kind == "classification"), "labels", m.kind,
                       m.output_dim, len(support))
    flops = check_adapt_cost(model_shape(m), len(support) + len(query), req.steps, settings)
    check_headers(settings, spec, {"support": support, "query": query})
    return {"support": {"images": pack_files(support), "y": ys.tolist()}, "query": {"images": pack_files(query)},
            "preprocessing": spec, "steps": req.steps, "modules": req.modules, "save_adapter": req.save_adapter,
            "cost_flops": flops}


def predict_payload(app, m, form) -> dict:
    """A multipart predict form -> the adapter predict payload (runs in a worker thread of the API)."""
    settings: Settings = app.state.settings
    _check_fields(form, PREDICT_FIELDS)
    spec = image_spec(app, m)
    files = _files(form, "x", settings.adapt_max_rows)
    check_headers(settings, spec, {"x": files})
    return {"images": pack_files(files), "preprocessing": spec}
