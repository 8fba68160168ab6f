"""worker/ranks.py's launcher loop on its own (no service): the multi-node failure paths that the service tests do
not reach in bounded time, against a real TCPStore with stand-ins for the rank processes and the job queries."""
from __future__ import annotations

import datetime
import time
from types import SimpleNamespace

import torch.distributed as dist

from worker import ranks


class Running:
    """A rank process that neither exits nor answers: ``poll()`` is None."""
    pid = 0

    def poll(self):
        return None

    def kill(self):
        pass

    def wait(self, timeout=None):
        return 0


class Queries:
    def owns(self, ses, job_id, owner):
        return True

    def renew(self, ses, job_id, owner, lease_seconds):
        return True


class DB:
    def session(self):
        class S:
            def __enter__(self):
                return None

            def __exit__(self, *a):
                return False
        return S()


def runtime(join_timeout=1.0):
    return SimpleNamespace(settings=SimpleNamespace(lease_seconds=60.0, join_timeout=join_timeout), db=DB())


def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=10))


def test_nodes_that_never_join_fail_the_attempt(tmp_path):
    st = store()
    t0 = time.monotonic()
    out = ranks._wait(runtime(join_timeout=1.0), Queries(), "job_x", "me", [Running()], tmp_path, st, nodes=2)
    assert out == "attempt-failed"
    assert 1.0 <= time.monotonic() - t0 < 10


def test_a_node_whose_beat_stops_fails_the_attempt(tmp_path, monkeypatch):
    monkeypatch.setattr(ranks, "NODE_TIMEOUT", 2.0)
    st = store()
    st.add("joined", 1)
    st.add("beat/1", 1)  # one beat, then silence (a machine that vanished without a TCP reset)
    t0 = time.monotonic()
    out = ranks._wait(runtime(join_timeout=60.0), Queries(), "job_x", "me", [Running()], tmp_path, st, nodes=2)
    assert out == "attempt-failed"
    assert 2.0 <= time.monotonic() - t0 < 10


def test_a_rank_lost_on_another_node_fails_the_attempt(tmp_path):
    st = store()
    st.add("joined", 1)
    st.add("failed", 1)
    out = ranks._wait(runtime(join_timeout=60.0), Queries(), "job_x", "me", [Running()], tmp_path, st, nodes=2)
    assert out == "attempt-failed"  # after GRACE: rank 0 may still finish on its own meanwhile


def test_rank_0_done_is_the_outcome(tmp_path):
    class Done(Running):
        def poll(self):
            return 0
    (tmp_path / "result").write_text("succeeded")
    assert ranks._wait(runtime(), Queries(), "job_x", "me", [Done(), Done()], tmp_path) == "succeeded"
