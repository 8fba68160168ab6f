"""What a worker process holds for its tasks (created after fork, in the prefork child): the database, the
artifact store, the Redis client, the uploaded datasets it has loaded, the resident meta-models and adapters
(worker/resident.py) and the device settings; plus the helpers every service module of the worker shares (the
error message a user sees, finite floats).

Nothing here imports torch or core/ at module level: the worker's parent process imports this module (through
worker.tasks) and must stay torch-free; torch is imported inside the functions that run in the child.
"""
from __future__ import annotations

import math
import os
from collections import OrderedDict

from celery.signals import worker_process_init
from sqlalchemy import select

from store.artifacts import make_store, public_message
from store.datasets import dataset_ids
from store.db import Database
from store.models import Dataset

from .celery_app import app
from .redis_util import redis_client
from .resident import Resident


class Runtime:
    """Per-process resources (created after fork)."""

    def __init__(self):
        self.settings = app.conf.metashrink_settings
        # torch.compile's caches (Inductor's FX graph cache, AOTAutograd's, the compile records of
        # core.compile_cache) in the data directory: a later job of the same shape, in this process, another
        # worker process of this host or after a restart, loads the compiled code instead of compiling it. Only
        # the environment variable is set (torch reads it at every compile; nothing imports torch here), and the
        # ranks of a multi-rank job inherit it
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.settings.compile_cache_path())
        self.db = Database(self.settings.database_url)
        self.store = make_store(self.settings)
        self.redis = redis_client(self.settings.broker())
        self.datasets: OrderedDict = OrderedDict()  # dataset id -> validated collection (small LRU)
        self._resident: Resident | None = None

    @property
    def resident(self) -> Resident:
        """Meta-models and adapters kept between requests (worker/resident.py), created at first use."""
        if self._resident is None:
            s = self.settings
            self._resident = Resident(self, s.adapt_cache_models, s.adapt_cache_adapters, s.adapt_cache_adapter_bytes)
        return self._resident

    def build_model(self, cfg: dict, uri: str, sha: str, tenant: str):
        """A MetaModel from its artifact (sha256 checked), on this worker's adapt device."""
        from core import MetaModel
        from core.trainer import resolve_device
        use_datasets(self, tenant, cfg["tasks"])
        tensors, meta = self.store.get_tensors(uri, sha256=sha)
        return MetaModel.from_tensors(cfg, ordered_tensors(tensors, meta), device=resolve_device(self.settings.adapt_device))


_rt: Runtime | None = None
_rt_pid: int | None = None


def runtime() -> Runtime:
    """This process's Runtime (a forked child makes its own)."""
    global _rt, _rt_pid
    if _rt is None or _rt_pid != os.getpid():
        _rt, _rt_pid = Runtime(), os.getpid()
    return _rt


@worker_process_init.connect
def _child_init(**_):
    from .embedded import die_with_parent
    die_with_parent()  # a pool child never outlives its worker (a SIGKILLed worker leaves no consumer behind)
    threads = app.conf.metashrink_settings.torch_threads
    if threads:
        import torch
        torch.set_num_threads(threads)


def use_datasets(rt: Runtime, tenant: str, tasks_cfg: dict) -> None:
    """Make the uploaded datasets a config names loadable in this process: ``import datasets`` registers the
    ``omniglot`` and ``dataset`` sources with core.tasks, and each id resolves, through the database, to the
    collection the job's tenant uploaded (another tenant's id is "not found")."""
    import datasets

    for did in dataset_ids(tasks_cfg):
        with rt.db.session() as ses:
            row = ses.scalar(select(Dataset).where(Dataset.id == did, Dataset.tenant == tenant))
            if row is None:
                raise ValueError(f"dataset {did} not found (datasets belong to the tenant that uploaded them)")
            uri, sha = row.uri, row.sha256
        datasets.register_dataset(did, _DatasetLoader(rt, did, uri, sha))


class _DatasetLoader:
    """Loads one uploaded dataset's collection when a job first asks for it, kept in ``rt.datasets`` (the 4 most
    recently used)."""

    def __init__(self, rt: Runtime, did: str, uri: str, sha: str):
        self.rt, self.did, self.uri, self.sha = rt, did, uri, sha

    def __call__(self):
        from datasets.stored import get_collection
        cache = self.rt.datasets
        if self.did in cache:
            cache.move_to_end(self.did)
            return cache[self.did]
        coll = get_collection(self.rt.store, self.uri, sha256=self.sha)
        cache[self.did] = coll
        while len(cache) > 4:
            cache.popitem(last=False)
        return coll


def ordered_tensors(tensors: dict, meta: dict) -> dict:
    """Restore the parameter order recorded at publish time (MetaModel.from_tensors builds its module
    partition from the dict order; safetensors returns keys sorted)."""
    order = meta.get("order") or list(tensors)
    return {k: tensors[k] for k in order}


def public_error(rt: Runtime, e: BaseException) -> str:
    """The error as the API shows it (job and evaluation errors, adapt 500s): no path of this server in it."""
    from datasets.omniglot import default_directory
    code = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return public_message(e, (os.path.abspath(rt.settings.data_dir), str(rt.store.root), code,
                              str(default_directory())))


def finite(v):
    """``v`` as a float, or None when it is NaN or infinite (JSON has neither)."""
    v = float(v)
    return v if math.isfinite(v) else None
