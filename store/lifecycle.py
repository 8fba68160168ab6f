"""Deleting a tenant's resources: what depends on what, the rows, and the artifact files.

Each ``delete_*`` takes a session and a row the caller owns, raises ``Conflict`` (the API's 409, naming what
depends on the resource) or deletes the rows and returns the artifacts to remove; the caller removes them with
``remove_artifacts`` once the transaction has committed (a failure in between leaves an orphan file, never a row
naming a missing file).

The rules (the API's DELETE routes state them too):

- job: a queued or running job must be canceled first (the API's DELETE asks, and waits for its worker); a job whose published model still exists
  conflicts (delete the model first). Its metrics, module maps and checkpoints go with it, and every file under
  ``jobs/<id>/`` (checkpoints of lost attempts included).
- model: conflicts while an evaluation of it is queued or running (delete or await the evaluation). Its adapters
  and finished evaluations go with it; the job that published it stays, its ``model_id`` a record of the past.
- checkpoint: conflicts while its job is queued or running (the worker resumes from and writes checkpoints).
- dataset: conflicts while a queued or running job trains on it, or while a published model was trained on it
  (its evaluations and adaptations load the dataset's tasks). A failed or canceled job that used it stays, and
  fails on retry ("dataset ... not found"). One still processing can go: its file then is the raw upload, and
  the datasets worker, finding the row gone, removes what it wrote (worker/dataset_tasks.py).
- adapter: nothing depends on it.
- evaluation: never conflicts; a queued one is never claimed, a running one stops at its next progress report
  (the worker finds its row gone and writes nothing more).
"""
from __future__ import annotations


from sqlalchemy import delete, select, update

from .datasets import dataset_ids
from .jobs import ACTIVE
from .models import Adapter, Checkpoint, Dataset, Evaluation, Job, JobMetric, MetaModelRow, ModuleMap


class Conflict(Exception):
    """Something still depends on the resource; the message names it. ``retry_after``: seconds after which the
    same request may succeed (a job still stopping)."""

    def __init__(self, detail: str, retry_after: int | None = None):
        super().__init__(detail)
        self.detail, self.retry_after = detail, retry_after


def _names(ids, n=5) -> str:
    ids = list(ids)
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


# --------------------------------------------------------------------------- jobs
def delete_job(s, job: Job) -> list:
    if job.status in ACTIVE:
        raise Conflict(f"job {job.id} is {job.status}; cancel it first")
    model = s.scalar(select(MetaModelRow.id).where(MetaModelRow.job_id == job.id))
    if model is not None:
        raise Conflict(f"job {job.id} published model {model}, which still exists; delete the model first")
    uris = list(s.scalars(select(Checkpoint.uri).where(Checkpoint.job_id == job.id)))
    for table in (JobMetric, ModuleMap, Checkpoint):
        s.execute(delete(table).where(table.job_id == job.id))
    s.execute(delete(Job).where(Job.id == job.id))
    return uris + [("prefix", f"jobs/{job.id}")]


def delete_checkpoint(s, ckpt: Checkpoint, job: Job) -> list:
    if job.status in ACTIVE:
        raise Conflict(f"checkpoint {ckpt.id} belongs to job {job.id}, which is {job.status} (it resumes from "
                       f"and writes checkpoints); cancel the job or wait for it to finish")
    if job.best_checkpoint_id == ckpt.id:  # the job's record of its best validation step no longer has a file
        s.execute(update(Job).where(Job.id == job.id).values(best_checkpoint_id=None)
                  .execution_options(synchronize_session=False))
    s.execute(delete(Checkpoint).where(Checkpoint.id == ckpt.id))
    return [ckpt.uri]


# --------------------------------------------------------------------------- models and what hangs off them
def delete_model(s, m: MetaModelRow) -> list:
    active = s.scalars(select(Evaluation.id).where(Evaluation.model_id == m.id, Evaluation.status.in_(ACTIVE))).all()
    if active:
        raise Conflict(f"model {m.id} has evaluations queued or running: {_names(active)}; wait for them to "
                       f"finish or delete them first")
    uris = list(s.scalars(select(Adapter.uri).where(Adapter.model_id == m.id)))
    s.execute(delete(Adapter).where(Adapter.model_id == m.id))
    s.execute(delete(Evaluation).where(Evaluation.model_id == m.id))
    s.execute(delete(MetaModelRow).where(MetaModelRow.id == m.id))
    return uris + [m.uri]


def delete_adapter(s, a: Adapter) -> list:
    s.execute(delete(Adapter).where(Adapter.id == a.id))
    return [a.uri]


def delete_evaluation(s, e: Evaluation) -> list:
    s.execute(delete(Evaluation).where(Evaluation.id == e.id))
    return []


# --------------------------------------------------------------------------- datasets
def delete_dataset(s, d: Dataset) -> list:
    jobs = [j.id for j in s.scalars(select(Job).where(Job.tenant == d.tenant, Job.status.in_(ACTIVE))
                                    .order_by(Job.created_at))
            if d.id in dataset_ids(j.config.get("tasks") or {})]
    if jobs:
        raise Conflict(f"dataset {d.id} is used by jobs still queued or running: {_names(jobs)}; cancel them "
                       f"or wait for them to finish")
    models = [m.id for m in s.scalars(select(MetaModelRow).where(MetaModelRow.tenant == d.tenant)
                                      .order_by(MetaModelRow.created_at))
              if d.id in dataset_ids(m.config.get("tasks") or {})]
    if models:
        raise Conflict(f"dataset {d.id} is the task source of models {_names(models)} (their evaluations and "
                       f"adaptations load it); delete those models first")
    uri = d.uri
    while uri is not None:
        if s.execute(delete(Dataset).where(Dataset.id == d.id, Dataset.uri == uri)).rowcount:
            return [uri]
        # the datasets worker finished it since it was read (processing -> ready moves it to a new file): that
        # file is the one to remove, not the raw upload read before
        uri = s.scalar(select(Dataset.uri).where(Dataset.id == d.id))
    return []


def remove_artifacts(store, artifacts: list) -> None:
    """After the commit: the files of deleted rows (uris) and whole prefixes (``("prefix", key)``)."""
    for a in artifacts:
        if isinstance(a, tuple):
            store.delete_prefix(a[1])
        else:
            store.delete(a)
