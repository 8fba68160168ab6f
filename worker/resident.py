"""What a worker process keeps between adapt requests: meta-models and adapters, ready on their device.

- ``models``: ``MetaModel`` objects (module partition, flat adapt layouts, prior precisions built once) by model id,
  each with the sha256 of the artifact it was built from, at most ``adapt_cache_models`` (least recently used out);
- ``adapters``: an adapter's tensors already on its model's device and dtype, by adapter id with their sha256, at
  most ``adapt_cache_adapters`` entries and ``adapt_cache_adapter_bytes`` bytes.

A request carries the sha256 the API read with the row it checked (the tenant's own model or adapter), so a hit
needs neither the database nor the artifact store. A miss reads the row (gone since the API looked: 404) and the
file (sha256 checked, as every read of the store). An entry whose sha256 differs from the request's is rebuilt.

Deleting a model or an adapter publishes ``model:ID`` / ``adapter:ID`` on ``EVICT_CHANNEL`` (api/routes/lifecycle.py);
every process holding a ``Resident`` listens on a daemon thread and drops the entry at once (a model takes its
adapters with it), so a deleted model's memory is freed without waiting for the LRU. A message lost while the
subscription was down can never serve a deleted model (the API answers 404 for it before anything is sent, and a
sha256 names one file): it only holds memory, and after every (re)subscription the next request sweeps the cache
against the database.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict

from sqlalchemy import select

from store.models import Adapter, MetaModelRow

from .redis_util import EVICT_CHANNEL, redis_client

log = logging.getLogger("metashrink.worker")


class NotFound(LookupError):
    """The model or adapter of an adapt request is gone (deleted after the API found it): the API answers 404."""


class LRU:
    """An ordered dict bounded by entries and (optionally) bytes; the least recently used goes first."""

    def __init__(self, max_items: int, max_bytes: int | None = None):
        self.max_items, self.max_bytes = max_items, max_bytes
        self.data: OrderedDict = OrderedDict()
        self.sizes: dict = {}
        self.bytes = 0

    def get(self, key):
        v = self.data.get(key)
        if v is not None:
            self.data.move_to_end(key)
        return v

    def put(self, key, value, nbytes: int = 0) -> None:
        self.pop(key)
        self.data[key], self.sizes[key] = value, nbytes
        self.bytes += nbytes
        while len(self.data) > self.max_items or (self.max_bytes is not None and self.bytes > self.max_bytes
                                                   and len(self.data) > 1):
            self.pop(next(iter(self.data)))

    def pop(self, key):
        self.bytes -= self.sizes.pop(key, 0)
        return self.data.pop(key, None)

    def __contains__(self, key):
        return key in self.data

    def __len__(self):
        return len(self.data)


class Resident:
    """``model(id, sha256)`` and ``adapter(id, sha256, model)`` from memory when they are there (see the module
    docstring). Thread-safe: the eviction listener runs beside the task that uses the caches."""

    def __init__(self, rt, max_models: int, max_adapters: int, max_adapter_bytes: int, listen: bool = True):
        self.rt = rt
        self.lock = threading.RLock()
        self.models = LRU(max_models)                           # id -> (sha256, MetaModel)
        self.adapters = LRU(max_adapters, max_adapter_bytes)    # id -> (sha256, model id, {name: tensor})
        self.stale = False  # set after a (re)subscription: the next request sweeps against the database
        self.loads = {"model": 0, "adapter": 0}                 # misses, for tests and logs
        self.closed = threading.Event()
        if listen:
            threading.Thread(target=self._listen, name="metashrink-evict", daemon=True).start()

    # ------------------------------------------------------------------ reads
    def model(self, model_id: str, sha256: str | None = None):
        """The meta-model ``model_id``; ``sha256`` (the API's row) None: whatever the database says now."""
        self._sweep_if_stale()
        with self.lock:
            hit = self.models.get(model_id)
            if hit is not None and (sha256 is None or hit[0] == sha256):
                return hit[1]
        with self.rt.db.session() as ses:
            row = ses.scalar(select(MetaModelRow).where(MetaModelRow.id == model_id))
            if row is None:  # deleted since the API looked it up
                raise NotFound(f"model {model_id} not found")
            cfg, uri, sha, tenant = row.config, row.uri, row.sha256, row.tenant
        with self.lock:
            hit = self.models.get(model_id)
            if hit is not None and hit[0] == sha:
                return hit[1]
        mm = self.rt.build_model(cfg, uri, sha, tenant)
        with self.lock:
            self.models.put(model_id, (sha, mm))
            self.loads["model"] += 1
        return mm

    def adapter(self, adapter_id: str, sha256: str | None, mm) -> dict:
        """The adapter's tensors on ``mm``'s device and dtype (``mm``: its model, from ``model``)."""
        with self.lock:
            hit = self.adapters.get(adapter_id)
            if hit is not None and (sha256 is None or hit[0] == sha256):
                return hit[2]
        with self.rt.db.session() as ses:
            row = ses.get(Adapter, adapter_id)
            if row is None:  # deleted since the API looked it up
                raise NotFound(f"adapter {adapter_id} not found")
            model_id, uri, sha = row.model_id, row.uri, row.sha256
        tensors, _ = self.rt.store.get_tensors(uri, sha256=sha)
        tensors = {k: v.to(mm.device, mm.phi[k].dtype) for k, v in tensors.items()}
        with self.lock:
            self.adapters.put(adapter_id, (sha, model_id, tensors),
                              sum(t.numel() * t.element_size() for t in tensors.values()))
            self.loads["adapter"] += 1
        return tensors

    # ------------------------------------------------------------------ eviction
    def evict(self, kind: str, id_: str) -> None:
        with self.lock:
            dropped = []
            if kind == "model":
                if self.models.pop(id_) is not None:
                    dropped.append(id_)
                for aid in [a for a, v in self.adapters.data.items() if v[1] == id_]:
                    self.adapters.pop(aid)
                    dropped.append(aid)
            elif kind == "adapter" and self.adapters.pop(id_) is not None:
                dropped.append(id_)
        if dropped:
            log.info("adapt cache: dropped %s (%s %s deleted)", ", ".join(dropped), kind, id_)

    def sweep(self) -> None:
        """Drop every entry whose row is gone or names another file (messages missed while not subscribed)."""
        with self.lock:
            models = {k: v[0] for k, v in self.models.data.items()}
            adapters = {k: v[0] for k, v in self.adapters.data.items()}
        with self.rt.db.session() as ses:
            alive_m = dict(ses.execute(select(MetaModelRow.id, MetaModelRow.sha256)
                                       .where(MetaModelRow.id.in_(list(models)))).all()) if models else {}
            alive_a = dict(ses.execute(select(Adapter.id, Adapter.sha256)
                                       .where(Adapter.id.in_(list(adapters)))).all()) if adapters else {}
        for k, sha in models.items():
            if alive_m.get(k) != sha:
                self.evict("model", k)
        for k, sha in adapters.items():
            if alive_a.get(k) != sha:
                self.evict("adapter", k)

    def _sweep_if_stale(self) -> None:
        if self.stale:
            self.stale = False
            try:
                self.sweep()
            except Exception:
                self.stale = True
                log.exception("adapt cache sweep failed; retried at the next request")

    def close(self) -> None:
        """Stop the eviction listener (within its 1 s poll)."""
        self.closed.set()

    def _listen(self) -> None:
        while not self.closed.is_set():
            try:
                # retry=False: a lost connection raises here (redis-py would otherwise resubscribe silently,
                # and messages published meanwhile would go unnoticed)
                sub = redis_client(self.rt.settings.broker(), retry=False).pubsub(ignore_subscribe_messages=True)
                sub.subscribe(EVICT_CHANNEL)
                self.stale = True
                while not self.closed.is_set():
                    msg = sub.get_message(timeout=1.0)
                    if msg and msg.get("type") == "message":
                        kind, _, id_ = msg["data"].decode().partition(":")
                        self.evict(kind, id_)
            except Exception as e:  # the broker restarted or is down: subscribe again, then sweep
                if self.closed.is_set():
                    return
                log.warning("adapt cache: eviction listener lost its subscription (%s); retrying", e)
                self.closed.wait(1.0)
