"""Where torch.compile's artifacts live, and what a compile of a job's meta-step cost the last time.

torch.compile keeps three caches on disk, all under one directory (``TORCHINDUCTOR_CACHE_DIR``, read by torch on
every compile, default ``/tmp/torchinductor_<user>``): Inductor's FX graph cache (``fxgraph/``: generated and
built kernels), AOTAutograd's cache (``aotautograd/``: the forward/backward split, pointing into the FX graph
cache) and the C++ build products. Their keys are torch's own and cover everything the generated code depends
on: the traced graph with every input's shape, stride and dtype (the jobs compile with ``dynamic=False``),
constants baked into the graph (learning rates, inner steps), the Inductor and functorch configs, the torch
version, the compiler and CPU, and for CPU kernels the intra-op thread count they were generated for
(``torch._inductor.codecache``). A second process that traces the same graph loads the compiled code instead of
generating it: a first compiled step that took 24-35 s cold takes about 3 s (Dynamo still traces the Python each
time; benchmarks/RESULTS.md, "Compile cache").

On top of that, :class:`CompileRecords` keeps one small JSON file per job shape (``records_dir()``, beside the
caches, so the two are deleted together): how long its last compile took, whether it was cold or warm, and the
measured eager and compiled step times. ``execution.compile: "auto"`` reads it to predict what compiling will
cost (a warm cache: seconds) and whether it pays (a compiled step that was slower than eager is not tried again
for a week, ``core.trainer.RETRY_SLOWER_AFTER_S``).
The record's key (:func:`shape_key`) is this code's, and errs on the side of telling apart configs the compiled
graph may not depend on (a record missing only costs a conservative estimate); correctness never depends on it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from pathlib import Path

import torch

RECORDS = "metashrink-compile-records"


def use_cache_dir(path) -> str:
    """Point torch.compile's on-disk caches (Inductor's FX graph cache, AOTAutograd's cache, C++ builds) at
    ``path`` for this process and the processes it starts, and make sure both caches are on. Call it before the
    first compile; a process that already compiled keeps what it compiled in memory."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return path


def cache_dir() -> str:
    """The directory torch.compile's caches go to now (``TORCHINDUCTOR_CACHE_DIR`` or torch's default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir
    return inductor_cache_dir()


def records_dir() -> Path:
    return Path(cache_dir()) / RECORDS


def cache_counters() -> dict:
    """Cumulative hits and misses of the FX graph and AOTAutograd caches in this process."""
    from torch._dynamo.utils import counters
    return {"fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def counters_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def shape_key(config: dict, mode: str, device: torch.device, input_shape, output_dim) -> str:
    """A key for one job shape: the config's sections that can change the compiled graph (everything except
    the seed, the number of outer steps, the run section, the compile switch, the rank layout and dataset ids)
    with the vectorization actually used, the family's input shape and output size, the device type, the
    intra-op thread count and the torch version."""
    c = copy.deepcopy(config)
    for k in ("seed", "run"):
        c.pop(k, None)
    c.get("outer", {}).pop("steps", None)
    ex = c.get("execution", {})
    for k in ("compile", "world_size", "nodes", "device"):
        ex.pop(k, None)
    ex["vectorize"] = mode
    c.get("tasks", {}).pop("dataset_id", None)
    c["_shape"] = {"input_shape": list(input_shape), "output_dim": int(output_dim), "device": device.type,
                   "threads": torch.get_num_threads(), "torch": torch.__version__}
    blob = json.dumps(c, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class CompileRecords:
    """One JSON file per :func:`shape_key` under ``records_dir()``: the last compile's cost and the measured
    step times. Written atomically; concurrent writers (two workers of one host) leave one of their records."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else records_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict | None:
        try:
            return json.loads(self.path(key).read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, **values) -> dict:
        rec = {**(self.get(key) or {}), **values, "torch": torch.__version__, "updated_at": time.time()}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".{key}.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(rec, sort_keys=True))
            os.replace(tmp, self.path(key))
        except OSError:  # a read-only or full cache directory costs the next job an estimate, nothing more
            pass
        return rec
