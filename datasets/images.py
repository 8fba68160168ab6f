"""Image files -> model inputs, through exactly the functions the training data went through.

A model's preprocessing (``store.preprocessing``: ``decode_size``, ``invert``, ``size``, ``scale``) names the
steps; each step here is the training code itself: ``upload._decode`` (Pillow, 8-bit grayscale) and
``upload._resize`` (the decode-time resize of the Omniglot reader and of uploads with ``image_size``), the
inversion of ``validate_image_zip`` (255 - value on the 8-bit image), ``core.images.resize`` (what
``ImageClasses`` does with the job's ``image_size``) and ``core.images.to_float``. So a PNG of the training set
gives the training tensor bit for bit (tests/test_image_inputs.py).

This runs in the adapt worker (it needs torch): the API checks the files' headers (pixels per image and per
request, before anything is decoded; api/images.py) and sends the files' bytes with the model's preprocessing;
``payload_inputs`` turns them into the arrays a JSON request would have carried.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from core.images import resize, to_float

from .upload import UploadError, _decode, _resize


def preprocess_image(raw: bytes, spec: dict, name: str = "image") -> torch.Tensor:
    """One image file -> float32 ``spec["input_shape"]`` (channels, H, W), as its training data was made."""
    a = _decode(raw, name, None)  # uint8 [H, W]
    if spec.get("decode_size"):
        a = _resize(a, int(spec["decode_size"]))
    if spec.get("invert"):
        a = 255 - a
    t = torch.from_numpy(np.array(a, dtype=np.uint8))  # a writable copy
    if spec.get("size"):
        t = resize(t, int(spec["size"]))
    x = to_float(t).unsqueeze(0)  # uint8 / 255 (spec scale); the channel: one grayscale channel
    want = [int(v) for v in spec["input_shape"]]
    if list(x.shape) != want:
        raise UploadError(name, f"image of {a.shape[1]}x{a.shape[0]} pixels gives {list(x.shape)} after this "
                                f"model's preprocessing, but the model takes {want} (it was trained on "
                                f"{want[2]}x{want[1]} images and resizes none)")
    return x


def preprocess_images(files: Sequence[tuple[str, bytes]], spec: dict) -> np.ndarray:
    """``[(name, bytes), ...]`` -> float32 [N, *input_shape]; a bad file raises UploadError naming it."""
    if not files:
        return np.zeros([0, *spec["input_shape"]], dtype=np.float32)
    return torch.stack([preprocess_image(raw, spec, name) for name, raw in files]).numpy()


# --------------------------------------------------------------------------- adapt payloads (worker side)
def unpack_files(group: dict) -> list:
    """``[(name, bytes)]`` from a payload's image group: ``{"blob": uint8 array of the files' bytes one after
    the other, "sizes", "names"}`` (made by ``api.images.pack_files``; ``worker.wire`` carries the blob)."""
    blob = np.asarray(group["blob"], dtype=np.uint8).tobytes()
    out, at = [], 0
    for name, n in zip(group["names"], group["sizes"]):
        out.append((name, blob[at:at + int(n)]))
        at += int(n)
    return out


class ImageInputError(UploadError):
    """A file of a multipart request that its preprocessing refused: ``loc`` = [field, index]."""

    def __init__(self, field: str, index: int, e: UploadError):
        super().__init__(e.file, e.problem, e.member)
        self.loc = [field, index]


def _arrays(group: dict, spec: dict, field: str) -> np.ndarray:
    xs = []
    for i, (name, raw) in enumerate(unpack_files(group)):
        try:
            xs.append(preprocess_image(raw, spec, name))
        except UploadError as e:
            raise ImageInputError(field, i, e) from None
    # float64 like the arrays a JSON body carries (every float32 value is exact in float64)
    return torch.stack(xs).numpy().astype(np.float64)


def payload_inputs(payload: dict) -> dict:
    """In place: the ``images`` of a multipart request's payload (``support``/``query`` of an adapt, the top
    level of a predict) become the ``x`` arrays, preprocessed by the payload's ``preprocessing``. A payload
    without it (a JSON request) is left as it is. A file the preprocessing refuses raises ImageInputError (422)."""
    spec = payload.get("preprocessing")
    if not spec:
        return payload
    for field in ("support", "query"):
        part = payload.get(field)
        if isinstance(part, dict) and "images" in part:
            part["x"] = _arrays(part.pop("images"), spec, field)
    if "images" in payload:
        payload["x"] = _arrays(payload.pop("images"), spec, "x")
    return payload
