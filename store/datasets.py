"""Uploaded meta-datasets' rows: the uploaded dataset ids a job config names, and the processing state and quota of
an upload. The collections themselves are written to and read from the artifact store by ``datasets.stored`` (the
layer above, which knows the collection types); nothing here decodes a dataset.
"""
from __future__ import annotations


def dataset_ids(tasks_cfg: dict) -> list[str]:
    """The uploaded dataset ids a job's ``tasks`` config uses (empty for built-in families)."""
    if tasks_cfg.get("source") != "dataset":
        return []
    ids = tasks_cfg.get("dataset_id")
    return [str(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids]) if i]


# --------------------------------------------------------------------------- processing and the tenant's quota
def usage_by_kind(session, tenant: str) -> dict:
    """Bytes the tenant's artifacts store, by kind: ``datasets`` (each ready dataset's collection file, each
    processing one's estimate, its reservation; failed ones 0), ``checkpoints`` (of its jobs: retention keeps
    them bounded), ``models`` and ``adapters``; and their ``total``."""
    from sqlalchemy import func, select

    from .models import Adapter, Checkpoint, Dataset, Job, MetaModelRow

    def total(col, *where):
        return int(session.scalar(select(func.coalesce(func.sum(col), 0)).where(*where)))

    out = {"datasets": total(Dataset.bytes, Dataset.tenant == tenant),
           "checkpoints": total(Checkpoint.bytes, Checkpoint.job_id.in_(select(Job.id).where(Job.tenant == tenant))),
           "models": total(MetaModelRow.bytes, MetaModelRow.tenant == tenant),
           "adapters": total(Adapter.bytes, Adapter.tenant == tenant)}
    return {**out, "total": sum(out.values())}


def tenant_usage(session, tenant: str) -> int:
    """Bytes all of the tenant's artifacts store: what METASHRINK_TENANT_QUOTA_BYTES bounds (``usage_by_kind``)."""
    return usage_by_kind(session, tenant)["total"]


def lock_quota(session, tenant: str) -> None:
    """Serialise quota checks of one tenant until the transaction ends. PostgreSQL: a transaction-level advisory
    lock (READ COMMITTED would let two uploads each miss the other's row). SQLite: the caller writes its row
    before it reads the usage, and SQLite's single writer does the rest."""
    from sqlalchemy import text
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": f"metashrink-quota:{tenant}"})


def quota_problem(used: int, adding: int, quota: int, what: str = "this dataset") -> str | None:
    """The message when ``adding`` bytes to a tenant using ``used`` (``adding`` included) exceeds ``quota``
    (0: unlimited)."""
    if not quota or used <= quota:
        return None
    return (f"storing {what} ({adding:,} bytes) would bring the tenant's artifacts (datasets, checkpoints, models, "
            f"adapters) to {used:,} bytes, over its quota of {quota:,} bytes (in use before it: {used - adding:,} "
            f"bytes; GET /v1/usage); delete some or ask for a larger quota")


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
