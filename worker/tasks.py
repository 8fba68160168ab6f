"""The Celery task entry points of the ``train`` and ``adapt`` queues. Each one takes its message and hands the
work to the module that does it:

- ``run_job`` (train): claims the job, then worker/train.py trains it in this process, or worker/ranks.py launches
  and supervises its ranks (``execution.world_size`` > 1);
- ``run_evaluation`` (train): worker/evaluate.py;
- ``adapt``, ``adapter_predict``, ``adapters_predict`` (adapt): worker/adapt.py, which also explains how an
  adapt request's deadline (its message's expiry) cuts the work.

The process's resources (database, artifact store, Redis, resident models) are worker/runtime.py's. The task names
(``worker.tasks.*``, worker/celery_app.py) are what api/dispatch.py sends. torch and core/ are imported inside the
service modules' functions, i.e. in the prefork child process only.
"""
from __future__ import annotations

import logging

from . import adapt as adaptation
from . import evaluate, ranks, train
from .celery_app import ADAPT, ADAPTER_PREDICT, ADAPTERS_PREDICT, RUN_EVALUATION, RUN_JOB, app
from .lease import LeaseLost, new_owner
from .runtime import runtime
from .wire import unpack

log = logging.getLogger("metashrink.worker")


@app.task(name=RUN_JOB, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str):
    """Claim the job and run this attempt: "succeeded", "failed", "canceled", "lease-lost", "skipped" (not
    claimed) or, for a multi-rank job, "attempt-failed"."""
    rt, owner = runtime(), new_owner()
    if not train.claim(rt, job_id, owner):
        return "skipped"
    try:
        job = train.load(rt, job_id, owner)
        if job.world_size > 1:
            return ranks.supervise(rt, job_id, owner, job.config, job.tenant)
        return train.train(rt, job, hard_exit=True)
    except SystemExit:  # billiard's SIGTERM handler in pool children: a shutdown, or Celery cancelling the task
        # after losing the broker. Hand the job back now rather than when its lease expires.
        train.release(rt, job_id, owner)
        raise
    except LeaseLost:
        log.warning("job %s: lease lost; stopping", job_id)
        return "lease-lost"
    except Exception as e:  # a failure a person can act on: the config or the data, not the infrastructure
        return train.fail(rt, job_id, owner, e)


@app.task(name=RUN_EVALUATION, acks_late=True, reject_on_worker_lost=True)
def run_evaluation(eval_id: str):
    """Meta-test evaluation of a published model (core.evaluation.evaluate); the results go in its row."""
    return evaluate.run(runtime(), eval_id)


@app.task(name=ADAPT, bind=True, acks_late=True, reject_on_worker_lost=True)
def adapt(self, request_id: str, model_id: str, payload: dict):
    """Adapt a meta-model to one support set and predict the queries; the reply goes on a Redis list that
    the waiting API pops. Cut, without a reply, when the request's deadline (the message's expiry) passes."""
    adaptation.adapt(runtime(), request_id, model_id, unpack(payload), self.request.expires)


@app.task(name=ADAPTER_PREDICT, acks_late=True, reject_on_worker_lost=True)
def adapter_predict(request_id: str, adapter_id: str, payload: dict):
    """Predict with a stored adapter: the model's phi with the adapter's tensors in place of the adapted ones."""
    adaptation.adapter_predict(runtime(), request_id, adapter_id, unpack(payload))


@app.task(name=ADAPTERS_PREDICT, acks_late=True, reject_on_worker_lost=True)
def adapters_predict(request_id: str, payload: dict):
    """Predict with many stored adapters at once (``POST /v1/adapters/predict``), grouped by model."""
    adaptation.adapters_predict(runtime(), request_id, unpack(payload))
