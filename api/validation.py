"""Adapt request validation, for the JSON body (api/routes/models.py) and the multipart form (api/images.py):
the options against the model and the caps (``validate_options``), the arrays row by row (``validate_adapt``).
Each problem is named (field, row, what is wrong)."""
from __future__ import annotations

from types import SimpleNamespace
from typing import TYPE_CHECKING

import numpy as np

from schemas.cost import estimate_adapt, model_cost

from .errors import ApiError, unprocessable

if TYPE_CHECKING:
    from schemas.api import AdaptRequest
    from store.settings import Settings


def as_array(value, field, integer: bool = False) -> np.ndarray:
    try:
        arr = np.array(value)
    except (ValueError, TypeError):
        raise unprocessable(field, "ragged array: rows have different lengths (or nesting depths)")
    if arr.dtype == object:
        raise unprocessable(field, "ragged array or mixed types: every row must have the same shape and hold numbers")
    if arr.dtype.kind not in "iuf" or arr.dtype.kind == "b":
        raise unprocessable(field, f"must hold numbers only (got {arr.dtype.kind!r} values)")
    if arr.size == 0 or arr.shape[0] == 0:
        raise unprocessable(field, "must hold at least one row")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise unprocessable(field, f"contains NaN or Inf (first at index {list(idx)})")
    if integer:
        if arr.dtype.kind == "f":
            if not np.all(arr == np.round(arr)):
                raise unprocessable(field, "class labels must be integers")
            arr = arr.astype(np.int64)
    return arr


def check_inputs(arr: np.ndarray, field, input_shape: tuple) -> np.ndarray:
    want = tuple(input_shape)
    if arr.ndim == 1 and want == (1,):
        arr = arr[:, None]
    if tuple(arr.shape[1:]) != want:
        raise unprocessable(field, f"shape {list(arr.shape)} does not fit the model: expected [rows, "
                                   f"{', '.join(map(str, want))}]")
    return arr


def check_targets(arr: np.ndarray, field: str, kind: str, output_dim: int, rows: int) -> np.ndarray:
    if kind == "classification":
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr[:, 0]
        if arr.ndim != 1:
            raise unprocessable(field, f"shape {list(arr.shape)}: a classification model takes integer labels [rows]")
        if arr.dtype.kind == "f":
            raise unprocessable(field, "class labels must be integers")
        if arr.min() < 0 or arr.max() >= output_dim:
            raise unprocessable(field, f"class labels must be in [0, {output_dim - 1}]")
    else:
        if arr.ndim == 1 and output_dim == 1:
            arr = arr[:, None]
        if arr.ndim != 2 or arr.shape[1] != output_dim:
            raise unprocessable(field, f"shape {list(arr.shape)} does not fit the model: expected [rows, {output_dim}]")
    if arr.shape[0] != rows:
        raise unprocessable(field, f"has {arr.shape[0]} rows but support.x has {rows}")
    return arr


def model_shape(m) -> SimpleNamespace:
    """What the body checks need of a model row (kind, input_shape, output_dim, module_map), as a plain object
    that a parser process can receive."""
    return SimpleNamespace(kind=m.kind, input_shape=list(m.input_shape), output_dim=m.output_dim,
                           module_map=list(m.module_map),
                           macs=model_cost(m.config["model"], tuple(m.input_shape), m.output_dim)[2])


def check_adapt_cost(m, rows: int, steps: int, settings: Settings) -> float:
    """An adaptation's estimated flops (schemas/cost.py: rows x steps x the model's multiply-adds per row); 422 when
    above METASHRINK_ADAPT_MAX_FLOPS: no request holds an adapt worker for minutes, whatever its shape."""
    flops = estimate_adapt(m.macs, rows, steps)
    if flops > settings.adapt_max_flops:
        most = max(0, int(settings.adapt_max_flops / estimate_adapt(m.macs, rows, 0)) - 1)
        raise ApiError(422, f"steps: estimated {flops:.3g} flops for {rows} rows x {steps} steps is above this "
                            f"deployment's limit of {settings.adapt_max_flops:.3g} (METASHRINK_ADAPT_MAX_FLOPS); "
                            f"with {rows} rows at most {most} steps",
                       [{"loc": ["steps"], "msg": f"estimated {flops:.3g} flops > limit {settings.adapt_max_flops:.3g}"}])
    return flops


def validate_options(req: AdaptRequest, m, settings: Settings) -> None:
    """``steps`` and ``modules`` of an adapt request (JSON or multipart) against the model (a row, or
    ``model_shape``'s copy of one) and the caps."""
    if req.steps > settings.adapt_max_steps:
        raise unprocessable(["steps"], f"{req.steps} is above the cap of {settings.adapt_max_steps} steps")
    names = [r["name"] for r in m.module_map]
    if isinstance(req.modules, list):
        if not req.modules:
            raise unprocessable(["modules"], "an empty list adapts nothing; use steps 0 for unadapted predictions")
        unknown = [x for x in req.modules if x not in names]
        if unknown:
            raise unprocessable(["modules"], f"unknown modules {unknown}; this model's modules are {names}")


def validate_adapt(req: AdaptRequest, m, settings: Settings) -> dict:
    """A JSON adapt body's options and arrays checked; the arrays come back as numpy arrays."""
    validate_options(req, m, settings)
    cap = settings.adapt_max_rows
    for field, v in (("support.x", req.support.x), ("support.y", req.support.y), ("query.x", req.query.x)):
        if len(v) > cap:
            raise unprocessable(field.split("."), f"{len(v)} rows is above the cap of {cap} rows")
    cls = m.kind == "classification"
    xs = check_inputs(as_array(req.support.x, "support.x"), "support.x", tuple(m.input_shape))
    ys = check_targets(as_array(req.support.y, "support.y", integer=cls), "support.y", m.kind, m.output_dim,
                       xs.shape[0])
    xq = check_inputs(as_array(req.query.x, "query.x"), "query.x", tuple(m.input_shape))
    flops = check_adapt_cost(m, len(xs) + len(xq), req.steps, settings)
    return {"support": {"x": xs, "y": ys}, "query": {"x": xq}, "steps": req.steps, "modules": req.modules,
            "cost_flops": flops}
