"""Arrays in Celery messages: a numpy array travels as base64 of its raw bytes with its dtype and shape, not as
JSON lists of numbers, so neither the API process nor the worker builds millions of Python floats (the API
process would hold the GIL for that and stall its event loop)."""
from __future__ import annotations

import base64

import numpy as np

TAG = "__ndarray__"


def pack(obj):
    """``obj`` (nested dicts and lists) with every numpy array replaced by ``{TAG: base64, "dtype", "shape"}``."""
    if isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        return {TAG: base64.b64encode(a.tobytes()).decode("ascii"), "dtype": a.dtype.str, "shape": list(a.shape)}
    if isinstance(obj, dict):
        return {k: pack(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [pack(v) for v in obj]
    return obj


def unpack(obj):
    """The inverse of ``pack``: arrays back as (writable) numpy arrays."""
    if isinstance(obj, dict):
        if TAG in obj:
            return np.frombuffer(base64.b64decode(obj[TAG]), dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return {k: unpack(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [unpack(v) for v in obj]
    return obj
