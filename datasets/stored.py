"""Uploaded meta-datasets in the artifact store: validated collections as safetensors files (numpy arrays,
JSON metadata in the header). Nothing is ever unpickled.

- ``image_classes``: ``images`` uint8 [N, H, W] (every class's images, class after class) and ``counts``
  int64 [C]; the metadata holds ``keys`` ([group, class] per class), ``source`` and ``notes``.
- ``regression``: ``x`` float64 [N, d_in], ``y`` float64 [N, d_out] (task after task) and ``counts`` int64
  [T]; the metadata holds ``task_ids`` (JSON strings or integers) and ``source``.

``store`` moves the bytes (``put_bytes``, ``load_safetensors``); the collection types are this package's
(``datasets.upload``), so their file format lives here, above ``store``.
"""
from __future__ import annotations

import json

import numpy as np

from store.artifacts import ArtifactError, StoredArtifact

from .upload import ImageCollection, RegressionCollection


def _jsonable(v):
    return v.item() if isinstance(v, np.generic) else v


def collection_arrays(coll) -> tuple[dict, dict]:
    if isinstance(coll, ImageCollection):
        arrays = {"images": np.ascontiguousarray(np.concatenate(coll.images).astype(np.uint8)),
                  "counts": np.array([len(a) for a in coll.images], dtype=np.int64)}
        meta = {"kind": "image_classes", "keys": [list(k) for k in coll.keys], "source": coll.source,
                "notes": list(coll.notes)}
    elif isinstance(coll, RegressionCollection):
        arrays = {"x": np.ascontiguousarray(np.concatenate([x for _, x, _ in coll.tasks]).astype(np.float64)),
                  "y": np.ascontiguousarray(np.concatenate([y for _, _, y in coll.tasks]).astype(np.float64)),
                  "counts": np.array([len(x) for _, x, _ in coll.tasks], dtype=np.int64)}
        meta = {"kind": "regression", "task_ids": [_jsonable(t) for t, _, _ in coll.tasks], "source": coll.source}
    else:
        raise TypeError(f"not a dataset collection: {type(coll).__name__}")
    return arrays, meta


def put_collection(store, key: str, coll) -> StoredArtifact:
    from safetensors.numpy import save

    arrays, meta = collection_arrays(coll)
    return store.put_bytes(key, save(arrays, metadata={"metashrink": json.dumps(meta)}))


def get_collection(store, uri: str, sha256: str | None = None):
    """The ImageCollection / RegressionCollection stored at ``uri`` (sha256 checked when given; MissingArtifact,
    with no server path in it, when the file is gone), read through the store: a local file or an S3 object."""
    arrays, meta = store.load_safetensors(uri, sha256, "np")
    bounds = np.concatenate([[0], np.cumsum(arrays["counts"])]).astype(np.int64)
    parts = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
    if meta.get("kind") == "image_classes":
        imgs = arrays["images"]
        return ImageCollection([tuple(k) for k in meta["keys"]], [imgs[s] for s in parts], meta.get("source", ""),
                               list(meta.get("notes", [])))
    if meta.get("kind") == "regression":
        x, y = arrays["x"], arrays["y"]
        return RegressionCollection([(t, x[s], y[s]) for t, s in zip(meta["task_ids"], parts)],
                                    meta.get("source", ""))
    raise ArtifactError(f"dataset artifact {uri} has no known kind")
