"""The state of an upload being processed (store/datasets.py, store/jobs.py): the reconciler's re-send, a worker's
claim (attempts counted, spent -> failed), release, the one finish that wins, and the quota's arithmetic."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from store import jobs as Q
from store.datasets import (claim_processing, finish_processing, quota_problem, release_processing,
                            tenant_usage)
from store.db import Database
from store.migrate import upgrade
from store.models import Dataset, utcnow


@pytest.fixture
def db(tmp_path):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    upgrade(url)
    d = Database(url)
    yield d
    d.dispose()


def _add(db, did, tenant="t", status="processing", bytes_=100, enqueued_at=None):
    with db.session() as s:
        s.add(Dataset(id=did, tenant=tenant, kind="regression", name=did, summary={"upload": {"file": "a.csv"}},
                      uri=f"file:uploads/{did}.raw", sha256="0" * 64, bytes=bytes_, status=status,
                      attempts=0, enqueued_at=enqueued_at, created_at=utcnow()))


def test_reconciler_resends_processing_datasets_whose_message_is_stale(db):
    _add(db, "ds_never")  # sent while the broker was down: no message time
    _add(db, "ds_fresh", enqueued_at=utcnow())
    _add(db, "ds_old", enqueued_at=utcnow() - timedelta(seconds=600))
    _add(db, "ds_ready", status="ready", enqueued_at=None)
    with db.session() as s:
        assert sorted(Q.reconcile_datasets(s, 300)) == ["ds_never", "ds_old"]
    with db.session() as s:  # the message time was renewed: not again until it is stale
        assert Q.reconcile_datasets(s, 300) == []
        assert sorted(Q.reconcile_datasets(s, 0)) == ["ds_fresh", "ds_never", "ds_old"]  # resend_all


def test_claims_count_attempts_and_a_dataset_lost_every_time_fails(db):
    _add(db, "ds_a")
    for n in (1, 2, 3):
        with db.session() as s:
            assert claim_processing(s, "ds_a", 3) == "claimed"
            assert s.get(Dataset, "ds_a").attempts == n
    with db.session() as s:  # the worker died three times (e.g. killed for memory): the 4th delivery fails it
        assert claim_processing(s, "ds_a", 3) == "exhausted"
    with db.session() as s:
        d = s.get(Dataset, "ds_a")
        assert d.status == "failed" and "lost on every attempt (3)" in d.error and d.bytes == 0
        assert claim_processing(s, "ds_a", 3) == "skip"  # a late duplicate
    with db.session() as s:
        assert Q.reconcile_datasets(s, 0) == []  # nothing processing any more


def test_release_gives_the_attempt_back_and_one_finish_wins(db):
    _add(db, "ds_b", enqueued_at=utcnow())
    with db.session() as s:
        assert claim_processing(s, "ds_b", 3) == "claimed"
    with db.session() as s:
        release_processing(s, "ds_b")  # SIGTERM mid-way
        d = s.get(Dataset, "ds_b")
        assert d.attempts == 0 and d.enqueued_at is None  # the next sweep re-sends it
    with db.session() as s:
        assert finish_processing(s, "ds_b", "ready", summary={"kind": "regression"}, uri="file:datasets/b",
                                 sha256="1" * 64, bytes=4242)
        assert not finish_processing(s, "ds_b", "failed", error="a duplicate, later")
    with db.session() as s:
        d = s.get(Dataset, "ds_b")
        assert (d.status, d.bytes, d.error, d.summary) == ("ready", 4242, None, {"kind": "regression"})


def test_usage_and_quota_message(db):
    _add(db, "ds_1", bytes_=1000, status="ready")
    _add(db, "ds_2", bytes_=500)  # processing: its estimate is reserved
    _add(db, "ds_3", bytes_=0, status="failed")
    _add(db, "ds_other", tenant="u", bytes_=10 ** 9, status="ready")
    with db.session() as s:
        assert tenant_usage(s, "t") == 1500 and tenant_usage(s, "nobody") == 0
        s.execute(update(Dataset).where(Dataset.id == "ds_2").values(bytes=700))
        assert tenant_usage(s, "t") == 1700
    assert quota_problem(1700, 700, 0) is None  # unlimited
    assert quota_problem(1700, 700, 1700) is None
    msg = quota_problem(1700, 700, 1600)
    assert "(700 bytes) would bring the tenant's artifacts (datasets, checkpoints, models, adapters) to 1,700 bytes, " \
           "over its quota of 1,600 bytes" in msg
    assert "in use before it: 1,000 bytes" in msg
