"""The train worker keeps a job's lease through a meta-step longer than the lease (a compile: a minute or more
on a cold cache), and stops a job whose lease went to another worker meanwhile (worker.lease.LeaseKeeper)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from store import jobs as Q
from store.db import Database
from store.migrate import upgrade
from store.models import Job, new_id
from worker.lease import LeaseKeeper as _LeaseKeeper, LeaseLost


@pytest.fixture
def rt(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    db = Database(url)
    yield SimpleNamespace(db=db)
    db.dispose()


def _claimed(rt, lease):
    jid = new_id("job")
    with rt.db.session() as ses:
        ses.add(Job(id=jid, tenant="t", kind="train", status="queued", config={}, step=0, total_steps=1))
    with rt.db.session() as ses:
        assert Q.claim(ses, jid, "me", lease)
    return jid


def _expires(rt, jid):
    with rt.db.session() as ses:
        return ses.get(Job, jid).lease_expires_at


def test_a_long_step_keeps_the_lease(rt):
    lease = 0.6
    jid = _claimed(rt, lease)
    keeper = _LeaseKeeper(rt, jid, "me", lease)
    try:
        first = _expires(rt, jid)
        with keeper.step():
            time.sleep(4 * lease)
        assert keeper.renewals >= 2 and _expires(rt, jid) > first
        n = keeper.renewals
        time.sleep(3 * lease)  # between steps the training loop's own heartbeat is in charge
        assert keeper.renewals == n
    finally:
        keeper.close()


def test_a_lease_taken_over_during_a_long_step_stops_the_job(rt):
    lease = 0.6
    jid = _claimed(rt, lease)
    keeper = _LeaseKeeper(rt, jid, "me", lease)
    try:
        with rt.db.session() as ses:
            ses.get(Job, jid).lease_owner = "another worker"
        with pytest.raises(LeaseLost):
            with keeper.step():
                time.sleep(3 * lease)
    finally:
        keeper.close()
