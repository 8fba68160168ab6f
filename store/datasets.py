"""Uploaded meta-datasets in the artifact store: validated collections as safetensors files (numpy arrays,
JSON metadata in the header). Nothing is ever unpickled.

- ``image_classes``: ``images`` uint8 [N, H, W] (every class's images, class after class) and ``counts``
  int64 [C]; the metadata holds ``keys`` ([group, class] per class), ``source`` and ``notes``.
- ``regression``: ``x`` float64 [N, d_in], ``y`` float64 [N, d_out] (task after task) and ``counts`` int64
  [T]; the metadata holds ``task_ids`` (JSON strings or integers) and ``source``.
"""
from __future__ import annotations

import json

import numpy as np

from .artifacts import ArtifactError, StoredArtifact


def _jsonable(v):
    return v.item() if isinstance(v, np.generic) else v


def collection_arrays(coll) -> tuple[dict, dict]:
    from datasets.upload import ImageCollection, RegressionCollection

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
    from datasets.upload import ImageCollection, RegressionCollection

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


def dataset_ids(tasks_cfg: dict) -> list[str]:
    """The uploaded dataset ids a job's ``tasks`` config uses (empty for built-in families)."""
    if tasks_cfg.get("source") != "dataset":
        return []
    ids = tasks_cfg.get("dataset_id")
    return [str(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]) if i]


# --------------------------------------------------------------------------- processing and the tenant's quota
def tenant_usage(session, tenant: str) -> int:
    """Bytes the tenant's datasets store: each ready dataset's collection file, each processing one's estimate
    (its reservation; the raw upload kept meanwhile is not counted); failed ones store nothing (0)."""
    from sqlalchemy import func, select

    from .models import Dataset
    return int(session.scalar(select(func.coalesce(func.sum(Dataset.bytes), 0)).where(Dataset.tenant == tenant)))


def lock_quota(session, tenant: str) -> None:
    """Serialise quota checks of one tenant until the transaction ends. PostgreSQL: a transaction-level advisory
    lock (READ COMMITTED would let two uploads each miss the other's row). SQLite: the caller writes its row
    before it reads the usage, and SQLite's single writer does the rest."""
    from sqlalchemy import text
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"metashrink-quota:{tenant}"})


def quota_problem(used: int, adding: int, quota: int) -> str | None:
    """The 413 message when ``adding`` bytes to a tenant using ``used`` (``adding`` included) exceeds ``quota``
    (0: unlimited)."""
    if not quota or used <= quota:
        return None
    return (f"storing this dataset ({adding:,} bytes) would bring the tenant's datasets to {used:,} bytes, over "
            f"its quota of {quota:,} bytes (in use before it: {used - adding:,} bytes); delete datasets or ask for "
            f"a larger quota")


def claim_processing(session, dataset_id: str, max_attempts: int) -> str:
    """A worker's claim of a processing dataset: ``"claimed"`` (the attempt is counted and the message time
    renewed), ``"exhausted"`` (attempts spent: the dataset is failed now), or ``"skip"`` (not processing any
    more: a duplicate delivery, or deleted)."""
    from sqlalchemy import update

    from .models import Dataset, utcnow
    res = session.execute(update(Dataset).where(Dataset.id == dataset_id, Dataset.status == "processing",
                                                Dataset.attempts < max_attempts)
                          .values(attempts=Dataset.attempts + 1, enqueued_at=utcnow())
                          .execution_options(synchronize_session=False))
    if res.rowcount == 1:
        return "claimed"
    if finish_processing(session, dataset_id, "failed",
                         error=f"the worker processing this upload was lost on every attempt ({max_attempts}); "
                               f"see the datasets worker's log, e.g. for out-of-memory kills"):
        return "exhausted"
    return "skip"


def release_processing(session, dataset_id: str) -> None:
    """The worker was told to stop mid-way: this attempt is not counted and the reconciler's next sweep
    re-sends the message."""
    from sqlalchemy import update

    from .models import Dataset
    session.execute(update(Dataset).where(Dataset.id == dataset_id, Dataset.status == "processing",
                                          Dataset.attempts > 0)
                    .values(attempts=Dataset.attempts - 1, enqueued_at=None)
                    .execution_options(synchronize_session=False))


def finish_processing(session, dataset_id: str, status: str, error: str | None = None, **values) -> bool:
    """``processing`` -> ``ready`` (``values``: summary, uri, sha256, bytes) or ``failed`` (``error``; it stores
    nothing: bytes 0). False when the dataset is not processing (a duplicate finished first, or it is gone)."""
    from sqlalchemy import update

    from .models import Dataset
    if status == "failed":
        values = {**values, "bytes": 0}
    res = session.execute(update(Dataset).where(Dataset.id == dataset_id, Dataset.status == "processing")
                          .values(status=status, error=error, enqueued_at=None, **values)
                          .execution_options(synchronize_session=False))
    return res.rowcount == 1
