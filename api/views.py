"""Database rows as the JSON the API answers with."""

import math

from store.models import Dataset, Evaluation, Job, MetaModelRow


def job_view(j: Job, with_config: bool = False) -> dict:
    return {"id": j.id, "status": j.status, "progress": {"step": j.step, "total": j.total_steps},
            "metrics": j.metrics or {}, "error": {"message": j.error} if j.error else None,
            "model_id": j.model_id, "best_checkpoint_id": j.best_checkpoint_id, "attempts": j.attempts,
            "cancel_requested": j.cancel_requested, "startup": j.startup, "created_at": j.created_at,
            "updated_at": j.updated_at, "config": j.config if with_config else None}


def selection_view(entries: list, config: dict) -> dict:
    """The ``selection`` object of a module map (``core.adapt.selection`` decided ``selected`` in the worker;
    this restates its inputs without importing torch): the largest gap in natural-log sigma^2 and whether the
    selected modules are a strict subset."""
    s2 = [e["sigma2"] for e in entries]
    if not entries or any(v is None or v <= 0 for v in s2):
        return {"method": "none", "gap": None, "min_gap": None, "separated": False}
    logs = sorted((math.log(v) for v in s2), reverse=True)
    mods = config.get("modules", {})
    n_sel = sum(1 for e in entries if e["selected"])
    return {"method": mods.get("selection", "gap"), "gap": max((a - b for a, b in zip(logs, logs[1:])), default=0.0),
            "min_gap": mods.get("min_gap", math.log(100.0)),  # configs stored before min_gap existed
            "separated": 0 < n_sel < len(entries)}


def model_view(m: MetaModelRow, preprocessing: dict | None = None) -> dict:
    """``preprocessing``: the image input preprocessing (store.preprocessing.of_model); default: the recorded one."""
    if preprocessing is None and m.preprocessing:
        preprocessing = {**m.preprocessing, "recorded": True}
    total = sum(r["n_params"] for r in m.module_map) or 1
    sel = [r["name"] for r in m.module_map if r["selected"]]
    share = sum(r["n_params"] for r in m.module_map if r["selected"]) / total
    return {"id": m.id, "job_id": m.job_id, "kind": m.kind, "input_shape": m.input_shape,
            "output_dim": m.output_dim, "config": m.config, "module_map": m.module_map, "selected_modules": sel,
            "selection": selection_view(m.module_map, m.config), "selected_share": share, "sha256": m.sha256,
            "bytes": m.bytes, "created_at": m.created_at, "preprocessing": preprocessing}


def dataset_view(d: Dataset) -> dict:
    """The summary's counts and shapes (while ``processing``: what the headers said, and ``upload``), the status
    (``processing``, ``ready`` or ``failed``) and, when failed, the error. ``bytes``: what it stores and counts
    against the tenant's quota (processing: the estimate reserved; failed: 0); ``sha256`` once ready."""
    ready = d.status == "ready"
    return {**d.summary, "id": d.id, "kind": d.kind, "name": d.name, "status": d.status,
            "error": {"message": d.error} if d.error else None, "sha256": d.sha256 if ready else None,
            "bytes": d.bytes, "created_at": d.created_at.isoformat()}


def evaluation_view(e: Evaluation) -> dict:
    return {"id": e.id, "model_id": e.model_id, "status": e.status, "metric": e.metric, "results": e.results,
            "progress": {"done": e.done_tasks, "total": e.total_tasks},
            "error": {"message": e.error} if e.error else None, "request": e.request, "attempts": e.attempts,
            "created_at": e.created_at, "updated_at": e.updated_at, "finished_at": e.finished_at}
