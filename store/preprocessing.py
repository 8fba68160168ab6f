"""The input preprocessing of an image model: what turns an image file into the tensor the model was trained on.

Recorded on the model row when a job publishes (``models.preprocessing``) and answered in ``GET /v1/models/{id}``;
the adapt and predict endpoints apply it to uploaded image files (``datasets.images.preprocess_image``). It
restates what the training data went through, in order:

1. decode with Pillow, convert to 8-bit grayscale (``"color": "L"``, one channel);
2. ``decode_size``: resize right after decoding (Pillow; box filter when shrinking, bilinear when enlarging),
   as the Omniglot reader does with the job's ``image_size``; null: not at this stage (uploaded datasets);
3. ``invert``: 255 - value (dark strokes on a light background become high values): always for Omniglot, for
   an uploaded dataset what its upload decided (``invert="auto"``: mean pixel above mid-grey);
4. ``size``: resize the 8-bit image (``core.images.resize``: area averaging when shrinking, bilinear when
   enlarging, rounded) as ``ImageClasses`` does with the job's ``image_size``; null: the size is kept;
5. divide by ``scale`` (255) into float32 in [0, 1] (``core.images.to_float``).

The derivation here is plain dict logic (no torch, no Pillow) so that the API can answer it; datasets/ applies it.
"""
from __future__ import annotations

from typing import Optional, Sequence

from sqlalchemy import select


def dataset_preprocessing(summary: dict) -> Optional[dict]:
    """``{"decode_size", "invert"}`` of an uploaded image dataset from its summary: recorded by the upload
    (``preprocessing``), else read from its notes (uploads made before it was recorded always used
    ``invert="auto"`` and no decode-time resize, and noted an inversion)."""
    if summary.get("kind") != "image_classes":
        return None
    pre = summary.get("preprocessing")
    if isinstance(pre, dict) and isinstance(pre.get("invert"), bool):
        return {"decode_size": pre.get("decode_size"), "invert": pre["invert"]}
    notes = summary.get("notes")
    if not isinstance(notes, list):
        return None
    return {"decode_size": None, "invert": any(str(n).startswith("inverted") for n in notes)}


def image_preprocessing(tasks: dict, input_shape: Sequence[int],
                        dataset_summaries: Optional[Sequence[Optional[dict]]] = None) -> tuple[Optional[dict], str]:
    """``(spec, "")`` for a model trained on ``tasks`` (the job config's ``tasks``), or ``(None, why not)``.
    ``dataset_summaries``: the summaries of the uploaded datasets a ``source: "dataset"`` config names, in order
    (None for one that is gone)."""
    if not isinstance(tasks, dict) or tasks.get("family") != "image_classes":
        return None, f"this model was not trained on images (task family {tasks.get('family')!r})"
    source = tasks.get("source", "omniglot")
    size = tasks.get("image_size") or None
    if source == "omniglot":
        decode_size, invert = size, True
    elif source == "dataset":
        summaries = list(dataset_summaries or [])
        if not summaries or any(s is None for s in summaries):
            return None, ("the image preprocessing of this model was not recorded and cannot be derived: a dataset "
                          "it was trained on is gone")
        pres = [dataset_preprocessing(s) for s in summaries]
        if any(p is None for p in pres):
            return None, ("the image preprocessing of this model was not recorded and cannot be derived from its "
                          "datasets")
        if any(p != pres[0] for p in pres[1:]):
            return None, (f"this model's datasets were preprocessed differently ({pres}): no single preprocessing "
                          f"reproduces its training inputs")
        decode_size, invert = pres[0]["decode_size"], pres[0]["invert"]
    else:
        return None, f"unknown image source {source!r}"
    shape = [int(v) for v in input_shape]
    if len(shape) != 3 or shape[0] != 1:
        return None, f"input shape {shape} is not one grayscale channel"
    return {"kind": "image", "source": source, "color": "L", "channels": 1, "decode_size": decode_size,
            "invert": bool(invert), "size": size, "scale": 255.0, "input_shape": shape}, ""


def model_preprocessing(session, tenant: str, config: dict, input_shape) -> tuple[Optional[dict], str]:
    """``image_preprocessing`` of a job config, looking its uploaded datasets up in the database."""
    from .datasets import dataset_ids
    from .models import Dataset

    tasks = config.get("tasks") or {}
    summaries = None
    if tasks.get("family") == "image_classes" and tasks.get("source") == "dataset":
        ids = dataset_ids(tasks)
        rows = {d.id: d.summary for d in session.scalars(
            select(Dataset).where(Dataset.tenant == tenant, Dataset.id.in_(ids)))}
        summaries = [rows.get(i) for i in ids]
    return image_preprocessing(tasks, input_shape, summaries)


def of_model(session, m) -> tuple[Optional[dict], str]:
    """A model row's preprocessing: recorded at publish time, else derived from its config (older models),
    with ``"recorded"`` saying which."""
    if m.preprocessing:
        return {**m.preprocessing, "recorded": True}, ""
    spec, why = model_preprocessing(session, m.tenant, m.config or {}, m.input_shape or [])
    return ({**spec, "recorded": False} if spec else None), why
