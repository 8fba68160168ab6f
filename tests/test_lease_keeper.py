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


def _busy(seconds):
    """Python bytecode for ``seconds`` (where an interrupt lands), returning how long it ran."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        sum(range(1000))
    return time.monotonic() - t0


@pytest.mark.parametrize("why", ["cancel", "timeout", "memory"])
def test_the_watchdog_interrupts_a_running_step(rt, why):
    from worker.lease import StepInterrupted
    jid = _claimed(rt, 30)
    kw = {"timeout": {"max_step_s": 0.5}, "memory": {"max_growth": 50 * 2 ** 20}}.get(why, {})
    keeper = _LeaseKeeper(rt, jid, "me", 30, poll=0.2, **kw)
    hog = []
    try:
        if why == "cancel":
            with rt.db.session() as ses:
                Q.request_cancel(ses, jid)

        def step():
            if why == "memory":
                hog.append(bytearray(200 * 2 ** 20))  # resident: bytearray zero-fills its pages
            return _busy(20)

        t0 = time.monotonic()
        with pytest.raises(StepInterrupted) as e:
            keeper.run_step(step)
        assert time.monotonic() - t0 < 5
        assert e.value.cancel == (why == "cancel")
        assert {"cancel": "canceled", "timeout": "METASHRINK_STEP_TIMEOUT",
                "memory": "METASHRINK_JOB_MAX_MEMORY_BYTES"}[why] in e.value.reason
        assert _busy(0.5) >= 0.5  # nothing pending lands after the step
    finally:
        keeper.close()
