"""Adapt requests, answered on the Redis list the waiting API pops (``api.dispatch.run_adapt``): adapt a
meta-model to one support set and predict the queries (optionally saving the adapter), predict with one stored
adapter, or with many at once. Models and adapters come from the process's resident caches (worker/resident.py).

An adapt request's deadline travels as its message's expiry (the API sends it with ``expires=adapt_timeout``):
Celery drops a message that expired before it started, and ``adapt`` stops an adaptation still running when the
deadline passes (checked at every inner step), so work the caller has stopped waiting for (it got its 504) never
holds the adapt worker beyond it.

torch and datasets/ are imported inside the functions (the worker's parent process imports this module).
"""
from __future__ import annotations

import json
import logging
import time
from functools import partial

from celery.utils.time import maybe_iso8601
from pydantic_core import to_json

from store.artifacts import MissingArtifact
from store.models import Adapter, new_id

from .redis_util import reply_key
from .resident import NotFound
from .runtime import Runtime, public_error

log = logging.getLogger("metashrink.worker")


class DeadlinePassed(Exception):
    """The adapt request's deadline passed mid-adaptation: the caller has had its 504, nobody waits for a reply."""


# --------------------------------------------------------------------------- the three requests
def adapt(rt: Runtime, request_id: str, model_id: str, payload: dict, expires=None) -> None:
    """Adapt a meta-model to one support set and predict the queries; cut, without a reply, when the request's
    deadline (``expires``, the message's expiry) passes."""
    reply(rt, request_id, "adapt", partial(_adapt, rt, model_id, payload, expires))


def adapter_predict(rt: Runtime, request_id: str, adapter_id: str, payload: dict) -> None:
    """Predict with a stored adapter: the model's phi with the adapter's tensors in place of the adapted ones."""
    reply(rt, request_id, "adapter predict", partial(_adapter_predict, rt, adapter_id, payload))


def adapters_predict(rt: Runtime, request_id: str, payload: dict) -> None:
    """Predict with many stored adapters at once (``POST /v1/adapters/predict``): the items are grouped by model
    and each group runs as few forwards as its query shapes allow (``MetaModel.predict_many``: one vmap over the
    adapters whose queries have the same number of rows). The answer keeps the request's order."""
    reply(rt, request_id, "adapters predict", partial(_adapters_predict, rt, payload))


def reply(rt: Runtime, request_id: str, what: str, work) -> None:
    """Run ``work() -> dict`` and push its reply on the Redis list the waiting API pops: ``ok`` and a newline
    before the answer's JSON, which the API sends on as it is (``api.dispatch.run_adapt``); a JSON object with
    ``"ok": false`` for an error: a ValueError (bad input the core rejected) becomes a 422 message, a missing
    artifact file a 410, anything else a logged 500."""
    try:
        # pydantic_core's encoder: the same JSON as json.dumps (floats round-trip), ~10x faster on long float lists
        out = b"ok\n" + to_json(work(), inf_nan_mode="null")
    except DeadlinePassed as e:
        log.warning("%s %s cut at its deadline (%s); no reply", what, request_id, e)
        return
    except ValueError as e:
        out = {"ok": False, "status": 422, "message": str(e), **({"loc": e.loc} if hasattr(e, "loc") else {})}
    except NotFound as e:  # the model or adapter was deleted while the request was on its way: 404
        out = {"ok": False, "status": 404, "message": str(e)}
    except MissingArtifact as e:  # the model's or adapter's file is gone: 410, naming the artifact, not a path
        log.warning("%s %s: %s", what, request_id, e)
        out = {"ok": False, "status": 410, "message": str(e)}
    except Exception as e:
        log.exception("%s %s failed", what, request_id)
        out = {"ok": False, "status": 500, "message": public_error(rt, e)}
    key = reply_key(request_id)
    pipe = rt.redis.pipeline(transaction=False)  # one round trip; nothing reads the list between the two
    pipe.rpush(key, out if isinstance(out, bytes) else json.dumps(out))
    pipe.expire(key, 300)
    pipe.execute()


# --------------------------------------------------------------------------- the work of each
def _adapt(rt: Runtime, model_id: str, payload: dict, expires) -> dict:
    from datasets.images import payload_inputs
    payload_inputs(payload)  # image files (multipart requests) -> arrays, preprocessed as in training
    mm = rt.resident.model(model_id, payload.get("model_sha256"))
    res = mm.adapt(payload["support"]["x"], payload["support"]["y"], steps=payload["steps"],
                   modules=payload["modules"], interrupt=deadline_check(expires))
    out = {"predictions": predictions(mm.predict(payload["query"]["x"], res.params)),
           "adapted_modules": res.adapted_modules, "loss_curve": res.loss_curve,
           "diverged_at_step": res.diverged_at_step, "adapter_id": None}
    if payload.get("save_adapter"):
        out["adapter_id"] = save_adapter(rt, model_id, mm, res, payload)
    return out


def _adapter_predict(rt: Runtime, adapter_id: str, payload: dict) -> dict:
    from datasets.images import payload_inputs
    payload_inputs(payload)  # image files (multipart requests) -> arrays, preprocessed as in training
    mm, tensors = stored_adapter(rt, adapter_id, payload)
    return {"predictions": predictions(mm.predict(payload["x"], {**mm.phi, **tensors}))}


def _adapters_predict(rt: Runtime, payload: dict) -> dict:
    items = payload["items"]
    groups: dict = {}
    for i, it in enumerate(items):
        groups.setdefault(it["model_id"], []).append(i)
    out = [None] * len(items)
    for idx in groups.values():
        pairs = [stored_adapter(rt, items[i]["adapter_id"], items[i]) for i in idx]
        mm = pairs[0][0]
        preds = mm.predict_many([items[i]["x"] for i in idx], [t for _, t in pairs])
        for i, p in zip(idx, preds):
            try:
                out[i] = predictions(p)
            except ValueError as e:
                e.loc = ["items", i, "x"]
                raise
    return {"items": [{"adapter_id": it["adapter_id"], "predictions": p} for it, p in zip(items, out)]}


# --------------------------------------------------------------------------- helpers
def predictions(pred) -> list:
    """Finite predictions, or a ValueError (422): a forward pass that overflows is the input's magnitude."""
    import torch
    if not bool(torch.isfinite(pred).all()):
        raise ValueError("the model's output is not finite for these query inputs (their magnitude makes the "
                         "model overflow)")
    return pred.double().cpu().tolist()


def deadline_check(expires):
    """An ``interrupt`` callback for ``MetaModel.adapt`` that raises DeadlinePassed once the message's expiry
    (``self.request.expires``: an ISO 8601 string or a datetime; None without one) has passed."""
    if not expires:
        return None
    deadline = maybe_iso8601(expires).timestamp()

    def check(step):
        if time.time() > deadline:
            raise DeadlinePassed(f"after {step} steps")
    return check


def save_adapter(rt: Runtime, model_id: str, mm, res, payload: dict) -> str:
    """Store only the adapted task-specific tensors (``AdaptResult.adapter``) as a small safetensors file."""
    tensors = res.adapter(mm.partition)
    aid = new_id("adp")
    art = rt.store.put_tensors(f"adapters/{aid}.safetensors", tensors,
                               {"model_id": model_id, "modules": res.adapted_modules, "order": list(tensors)})
    with rt.db.session() as ses:
        ses.add(Adapter(id=aid, tenant=payload["tenant"], model_id=model_id, modules=list(res.adapted_modules),
                        steps=int(payload["steps"]), uri=art.uri, sha256=art.sha256, bytes=art.bytes))
    return aid


def stored_adapter(rt: Runtime, adapter_id: str, item: dict):
    """(meta-model, adapter tensors) of a predict request: from memory when the shas the API sent match what this
    process holds; else the adapter's row (404 when it is gone) and files."""
    if "model_id" not in item:  # a message sent before the API named the model (rolling upgrade)
        with rt.db.session() as ses:
            row = ses.get(Adapter, adapter_id)
            if row is None:
                raise NotFound(f"adapter {adapter_id} not found")
            item = {**item, "model_id": row.model_id}
    mm = rt.resident.model(item["model_id"], item.get("model_sha256"))
    return mm, rt.resident.adapter(adapter_id, item.get("adapter_sha256"), mm)
