"""Meta-test evaluation of a published model (``POST /v1/models/{id}/evaluations``): claim the evaluation's row, run
``core.evaluation.evaluate`` on the resident meta-model with progress heartbeats (which keep the lease), and write
the results (or the error as the API shows it) in its row.
"""
from __future__ import annotations

import logging
import time

from store import jobs as Q
from store.models import Evaluation

from .lease import LeaseLost, new_owner
from .runtime import Runtime, finite, public_error

log = logging.getLogger("metashrink.worker")


def run(rt: Runtime, eval_id: str) -> str:
    """Claim and run the evaluation: "succeeded", "failed", "lease-lost" or "skipped" (not claimed)."""
    owner = new_owner()
    claimed = claim(rt, eval_id, owner)
    if claimed is None:
        return "skipped"
    model_id, req = claimed
    try:
        metric, results = evaluate_model(rt, eval_id, owner, model_id, req)
        with rt.db.session() as ses:
            Q.finish_evaluation(ses, eval_id, owner, "succeeded", metric=metric, results=results,
                                done_tasks=req["n_tasks"])
        return "succeeded"
    except LeaseLost:
        log.warning("evaluation %s: lease lost; stopping", eval_id)
        return "lease-lost"
    except Exception as e:
        log.exception("evaluation %s failed", eval_id)
        with rt.db.session() as ses:
            Q.finish_evaluation(ses, eval_id, owner, "failed", error=public_error(rt, e))
        return "failed"


def claim(rt: Runtime, eval_id: str, owner: str) -> tuple[str, dict] | None:
    """(model id, request) of the evaluation once its lease is ours; None for a duplicate delivery, a finished
    evaluation, or one leased elsewhere."""
    with rt.db.session() as ses:
        if not Q.claim_evaluation(ses, eval_id, owner, rt.settings.lease_seconds):
            log.info("evaluation %s: not claimed (duplicate delivery, finished, or leased elsewhere)", eval_id)
            return None
        ev = ses.get(Evaluation, eval_id)
        return ev.model_id, dict(ev.request)


def evaluate_model(rt: Runtime, eval_id: str, owner: str, model_id: str, req: dict) -> tuple[str, list]:
    """(metric, results per step and modules) of the request on the model, as the evaluation's row holds them."""
    from core.evaluation import evaluate

    mm = rt.resident.model(model_id, None)
    r = evaluate(mm, n_tasks=req["n_tasks"], steps=req["steps"], modules=req["modules"], split=req["split"],
                 seed=req.get("seed", 0), progress=Progress(rt, eval_id, owner))
    results = [{"step": x["step"], "modules": x["modules"], "adapted": x.get("adapted"),
                "mean": finite(x["mean"]), "ci95": finite(x["ci95"]), "std": finite(x.get("std", float("nan"))),
                "n": x.get("n"), "diverged": x["diverged"]} for x in r["results"]]
    return r["metric"], results


class Progress:
    """``evaluate``'s progress callback: the tasks done go in the row (renewing the lease) at most every 2 s (a
    third of the lease when that is shorter) and at the end; LeaseLost when the lease is gone."""

    def __init__(self, rt: Runtime, eval_id: str, owner: str):
        self.rt, self.eval_id, self.owner = rt, eval_id, owner
        self.lease = rt.settings.lease_seconds
        self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if time.monotonic() - self.last < min(2.0, self.lease / 3) and done < total:
            return
        self.last = time.monotonic()
        with self.rt.db.session() as ses:
            if not Q.evaluation_progress(ses, self.eval_id, self.owner, self.lease, done):
                raise LeaseLost()
