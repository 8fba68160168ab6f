"""Uploaded datasets available to jobs in this process: ``{"source": "dataset", "dataset_id": ID or [IDs]}``.

The service resolves ids through its store; until then (and in notebooks) collections are registered here
in memory. ``register_dataset(id, collection)`` takes a validated ImageCollection or RegressionCollection,
or a zero-argument callable returning one (loaded lazily, e.g. from the artifact store).
"""
from __future__ import annotations

from typing import Callable, Union

from .upload import ImageCollection, RegressionCollection, combine_image_collections

_DATASETS: dict = {}


def register_dataset(dataset_id: str, collection: Union[ImageCollection, RegressionCollection, Callable]) -> None:
    _DATASETS[str(dataset_id)] = collection


def unregister_dataset(dataset_id: str) -> None:
    _DATASETS.pop(str(dataset_id), None)


def _get(dataset_id):
    if str(dataset_id) not in _DATASETS:
        raise KeyError(f"unknown dataset {dataset_id!r}")
    c = _DATASETS[str(dataset_id)]
    return c() if callable(c) else c


def dataset_loader(cfg: dict) -> dict:
    ids = cfg.get("dataset_id")
    ids = ids if isinstance(ids, (list, tuple)) else [ids]
    colls = [_get(i) for i in ids]
    if all(isinstance(c, ImageCollection) for c in colls):
        coll = colls[0] if len(colls) == 1 else combine_image_collections(colls)
        return coll.to_arrays()
    if all(isinstance(c, RegressionCollection) for c in colls):
        tasks = [t for c in colls for t in c.to_data()["tasks"]]
        return {"tasks": tasks}
    raise ValueError(f"datasets {ids} mix image and regression collections")
