"""Job queries: the conditional claim, heartbeat, terminal transitions and the reconciler's sweep."""
from __future__ import annotations

from datetime import timedelta

from sqlalchemy import and_, delete, or_, select, update

from .models import Checkpoint, Evaluation, Job, JobMetric, ModuleMap, utcnow

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "canceled")


def claim(session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Take the job's lease and count the attempt. False = someone else holds it, or it is not runnable
    (a duplicate delivery): the caller acknowledges and exits."""
    now = utcnow()
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE), Job.cancel_requested.is_(False),
               Job.attempts < Job.max_attempts,
               or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now))
        .values(status="running", lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1, updated_at=now, started_at=now)
        .execution_options(synchronize_session=False)
    )
    return res.rowcount == 1


def heartbeat(session, job_id: str, owner: str, lease_seconds: float, step: int, metrics: dict | None,
              startup: dict | None = None):
    """Renew the lease and write progress (and, when given, the attempt's ``startup``: time to the first step,
    the compile decision and time). Returns (still_owner, cancel_requested)."""
    now = utcnow()
    values = dict(lease_expires_at=now + timedelta(seconds=lease_seconds), step=step, updated_at=now)
    if metrics is not None:
        values["metrics"] = metrics
    if startup is not None:
        values["startup"] = startup
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(**values).execution_options(synchronize_session=False))
    if res.rowcount != 1:
        return False, False
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return True, bool(cancel)


def renew(session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """Extend the lease only (no progress written): a multi-rank job's launcher keeps it while its ranks start,
    until rank 0's own heartbeats take over. False = no longer ours."""
    now = utcnow()
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
        .values(lease_expires_at=now + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def owns(session, job_id: str, owner: str) -> bool:
    return session.scalar(select(Job.id).where(Job.id == job_id, Job.lease_owner == owner,
                                               Job.status == "running")) is not None


def abandon(session, job_id: str, owner: str) -> None:
    """This attempt failed without a verdict on the job (a rank of a multi-rank job died): the lease expires now,
    the attempt stays counted, and the reconciler's next sweep re-queues the job (which resumes from its latest
    checkpoint) or fails it once ``max_attempts`` consecutive attempts made no progress, as for a lost worker."""
    session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
                    .values(lease_expires_at=utcnow() - timedelta(seconds=1))
                    .execution_options(synchronize_session=False))


def made_progress(session, job_id: str, owner: str):
    """A checkpoint was recorded: this attempt is the first of a new run of attempts, so crashes that made
    progress never exhaust ``max_attempts``; only consecutive attempts that checkpoint nothing do."""
    session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner).values(attempts=1)
                    .execution_options(synchronize_session=False))


def release(session, job_id: str, owner: str) -> None:
    """The worker was told to stop (SIGTERM: a shutdown, or Celery cancelling tasks after losing the broker):
    the job goes back to ``queued`` at once, this attempt not counted, with no message on record, so the
    reconciler's next sweep sends it again."""
    session.execute(update(Job).where(Job.id == job_id, Job.lease_owner == owner, Job.status == "running")
                    .values(status="queued", lease_owner=None, lease_expires_at=None, enqueued_at=None,
                            attempts=Job.attempts - 1,  # a claim counted it: >= 1 while running
                            updated_at=utcnow())
                    .execution_options(synchronize_session=False))


def cancel_requested(session, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def request_cancel(session, job_id: str) -> None:
    """A queued job ends ``canceled`` at once (a worker's claim then refuses it); a running one gets
    ``cancel_requested``, which its worker reads at its next heartbeat and ends the job ``canceled`` (or the
    reconciler does, once the lease of a lost worker expires)."""
    now = utcnow()
    session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                    .values(status="canceled", cancel_requested=True, updated_at=now, finished_at=now)
                    .execution_options(synchronize_session=False))
    session.execute(update(Job).where(Job.id == job_id, Job.status == "running")
                    .values(cancel_requested=True, updated_at=now).execution_options(synchronize_session=False))


def retry(session, job_id: str) -> bool:
    """A failed or canceled job back to ``queued`` with a fresh attempt budget; the worker that claims it
    resumes from its latest checkpoint. False when the job is not failed or canceled."""
    now = utcnow()
    res = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_(("failed", "canceled")))
        .values(status="queued", attempts=0, cancel_requested=False, error=None, finished_at=None,
                lease_owner=None, lease_expires_at=None, updated_at=now, enqueued_at=now)
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def finish(session, job_id: str, owner: str | None, status: str, error: str | None = None, **extra) -> bool:
    now = utcnow()
    cond = [Job.id == job_id, Job.status.in_(ACTIVE)]
    if owner is not None:
        cond.append(Job.lease_owner == owner)
    res = session.execute(
        update(Job).where(*cond)
        .values(status=status, error=error, lease_owner=None, lease_expires_at=None, updated_at=now,
                finished_at=now, **extra)
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def forget_after(session, job_id: str, step: int):
    """On resume from a checkpoint at ``step``: drop what a lost attempt recorded after it."""
    session.execute(delete(JobMetric).where(JobMetric.job_id == job_id, JobMetric.step > step))
    session.execute(delete(ModuleMap).where(ModuleMap.job_id == job_id, ModuleMap.step > step))
    session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.step > step))


def latest_checkpoint(session, job_id: str):
    return session.scalar(select(Checkpoint).where(Checkpoint.job_id == job_id)
                          .order_by(Checkpoint.step.desc()).limit(1))


def expire_dead_local(session, hostname: str, alive) -> int:
    """Leases held by processes of this host that no longer exist (``alive(pid)`` false) expire now, so the
    sweep that follows re-queues their jobs and evaluations at once rather than when the lease runs out. Lease
    owners are ``host:pid:nonce``. Only for a single host's process tree (the embedded default), where the host
    name is unique and this process can see every worker's pid. Returns the number of leases expired."""
    now, n = utcnow(), 0
    for model in (Job, Evaluation):
        owners = session.scalars(select(model.lease_owner).where(
            model.status == "running", model.lease_owner.like(f"{hostname}:%"))).all()
        pids = {o: o.split(":")[-2] for o in owners if o.count(":") >= 2}
        dead = [o for o, pid in pids.items() if pid.isdigit() and not alive(int(pid))]
        if dead:
            session.execute(update(model).where(model.lease_owner.in_(dead), model.status == "running")
                            .values(lease_expires_at=now - timedelta(seconds=1))
                            .execution_options(synchronize_session=False))
            n += len(dead)
    return n


def reconcile(session, requeue_after: float) -> list[str]:
    """One sweep. Jobs whose lease expired (a lost worker) go back to ``queued`` or fail when their attempts
    are spent; a canceled-but-lost job ends ``canceled``; queued jobs whose message is older than
    ``requeue_after`` are re-sent. Returns the job ids to (re-)enqueue."""
    now = utcnow()
    expired = and_(Job.status == "running", Job.lease_expires_at < now)
    session.execute(
        update(Job).where(expired, Job.cancel_requested.is_(True))
        .values(status="canceled", lease_owner=None, lease_expires_at=None, updated_at=now, finished_at=now)
        .execution_options(synchronize_session=False))
    session.execute(
        update(Job).where(expired, Job.attempts >= Job.max_attempts)
        .values(status="failed", lease_owner=None, lease_expires_at=None, updated_at=now, finished_at=now,
                error="the worker running this job was lost on every attempt "
                      "(attempts exhausted); see the worker logs, e.g. for out-of-memory kills")
        .execution_options(synchronize_session=False))
    lost = session.scalars(select(Job.id).where(expired)).all()
    if lost:
        session.execute(
            update(Job).where(Job.id.in_(lost), expired)
            .values(status="queued", lease_owner=None, lease_expires_at=None, updated_at=now, enqueued_at=now)
            .execution_options(synchronize_session=False))
    stale = session.scalars(select(Job.id).where(
        Job.status == "queued", or_(Job.enqueued_at.is_(None), Job.enqueued_at < now - timedelta(seconds=requeue_after)))).all()
    if stale:
        session.execute(update(Job).where(Job.id.in_(stale)).values(enqueued_at=now)
                        .execution_options(synchronize_session=False))
    # queued jobs that can never be claimed again
    session.execute(
        update(Job).where(Job.status == "queued", Job.attempts >= Job.max_attempts)
        .values(status="failed", updated_at=now, finished_at=now,
                error="attempts exhausted before the job could finish")
        .execution_options(synchronize_session=False))
    return list(lost) + [j for j in stale if j not in lost]


# --------------------------------------------------------------------------- evaluations
EVAL_MAX_ATTEMPTS = 3


def claim_evaluation(session, eval_id: str, owner: str, lease_seconds: float) -> bool:
    """The evaluation's lease, as for jobs: False = a duplicate delivery, finished, or leased elsewhere."""
    now = utcnow()
    res = session.execute(
        update(Evaluation)
        .where(Evaluation.id == eval_id, Evaluation.status.in_(ACTIVE), Evaluation.attempts < EVAL_MAX_ATTEMPTS,
               or_(Evaluation.lease_expires_at.is_(None), Evaluation.lease_expires_at < now))
        .values(status="running", lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds),
                attempts=Evaluation.attempts + 1, updated_at=now)
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def evaluation_progress(session, eval_id: str, owner: str, lease_seconds: float, done: int) -> bool:
    now = utcnow()
    res = session.execute(
        update(Evaluation).where(Evaluation.id == eval_id, Evaluation.lease_owner == owner,
                                 Evaluation.status == "running")
        .values(done_tasks=done, lease_expires_at=now + timedelta(seconds=lease_seconds), updated_at=now)
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def finish_evaluation(session, eval_id: str, owner: str, status: str, **values) -> bool:
    now = utcnow()
    res = session.execute(
        update(Evaluation).where(Evaluation.id == eval_id, Evaluation.lease_owner == owner,
                                 Evaluation.status == "running")
        .values(status=status, lease_owner=None, lease_expires_at=None, updated_at=now, finished_at=now, **values)
        .execution_options(synchronize_session=False))
    return res.rowcount == 1


def reconcile_evaluations(session, requeue_after: float) -> list[str]:
    """Evaluations whose worker was lost (lease expired) or whose message is older than ``requeue_after``
    while still queued: the ids to re-send; those out of attempts fail."""
    now = utcnow()
    expired = and_(Evaluation.status == "running", Evaluation.lease_expires_at < now)
    session.execute(
        update(Evaluation).where(expired, Evaluation.attempts >= EVAL_MAX_ATTEMPTS)
        .values(status="failed", lease_owner=None, lease_expires_at=None, updated_at=now, finished_at=now,
                error="the worker running this evaluation was lost on every attempt")
        .execution_options(synchronize_session=False))
    lost = session.scalars(select(Evaluation.id).where(expired)).all()
    stale = session.scalars(select(Evaluation.id).where(
        Evaluation.status == "queued", or_(Evaluation.enqueued_at.is_(None),
                                           Evaluation.enqueued_at < now - timedelta(seconds=requeue_after)))).all()
    ids = list(lost) + [i for i in stale if i not in lost]
    if ids:
        session.execute(update(Evaluation).where(Evaluation.id.in_(ids))
                        .values(status="queued", lease_owner=None, lease_expires_at=None, enqueued_at=now,
                                updated_at=now).execution_options(synchronize_session=False))
    return ids


# --------------------------------------------------------------------------- datasets being processed
def reconcile_datasets(session, requeue_after: float) -> list[str]:
    """Datasets still ``processing`` whose message is older than ``requeue_after`` (sent while the broker was
    down, lost with it, or held by a worker that died): the ids to re-send. The message time is renewed; a
    worker's claim renews it too and counts the attempt, and refuses the dataset (failed) once they are spent."""
    from .models import Dataset
    now = utcnow()
    ids = session.scalars(select(Dataset.id).where(
        Dataset.status == "processing",
        or_(Dataset.enqueued_at.is_(None), Dataset.enqueued_at < now - timedelta(seconds=requeue_after)))).all()
    if ids:
        session.execute(update(Dataset).where(Dataset.id.in_(ids)).values(enqueued_at=now)
                        .execution_options(synchronize_session=False))
    return list(ids)
