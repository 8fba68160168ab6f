"""What a job config costs, estimated from the config alone, before anything runs (admission, issue 21).

``estimate_job`` counts the model's parameters and the floats one meta-step keeps alive from the shapes the config
names: the meta-parameters with the outer optimizer's state, the per-task inner-loop state (one parameter copy per
inner step for the algorithms that differentiate through the loop, a few otherwise), the task data and the
activations of every row. Tasks of a meta-batch are counted as if all were in memory at once (``vectorize``
``vmap`` does that; ``loop`` holds fewer), so the estimate is an upper bound for the algorithm families it knows,
within a small factor: it is the number admission compares with the deployment's limits, and the worker
enforces the limit on the measured resident memory as well (worker/lease.py), because an estimate can be wrong.

Compute is the multiply-adds of forward and backward over every row of every task, for every inner step and the
query pass, times the meta-steps. Nothing here imports torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

FLOAT = 4  # bytes: float32 training
# parameter copies the inner loop keeps per task, per inner step (differentiating through the loop) or in all
UNROLLED = {"maml", "sigma_maml", "meta_sgd", "tnet", "mtnet", "hypernet", "hyper_representation"}


@dataclass
class Cost:
    params: int
    memory_bytes: int
    step_flops: float
    total_flops: float
    checkpoint_bytes: int
    model_bytes: int
    # the config fields the estimate grows with, as (path, value): what a 422 names
    drivers: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"params": self.params, "memory_bytes": self.memory_bytes, "step_flops": self.step_flops,
                "total_flops": self.total_flops, "checkpoint_bytes": self.checkpoint_bytes,
                "model_bytes": self.model_bytes}


def _shapes(tasks: dict, dims: dict | None):
    """(input shape, output dim, rows of one task) from the task family; ``dims`` (input_shape, output_dim) for an
    uploaded dataset when the caller knows them."""
    fam = tasks.get("family") or "image_classes"
    shots, query = int(tasks.get("shots", 10)), int(tasks.get("query", 10))
    if fam == "image_classes":
        ways = int(tasks.get("ways", 5))
        size = tasks.get("image_size") or 105
        channels = 1 if tasks.get("source", "omniglot") == "omniglot" else 3
        shape = tuple((dims or {}).get("input_shape") or (channels, size, size))
        return shape, ways, ways * (shots + query)
    if fam == "hierarchical_normal":
        d = {"univariate": 1, "linear": 9, "swirl": 10}[tasks.get("variant", "univariate")]
        return (0,), d, shots + query
    if fam == "regression_dataset":
        d = dims or {}
        return tuple(d.get("input_shape") or (1,)), int(d.get("output_dim") or 1), shots + query
    return (1,), 1, shots + query  # sinusoid, polynomial


def _conv4(shape, out_dim, channels, variant):
    """(params, activation floats per row, multiply-adds per row) of core.models.Conv4."""
    c_in, s = shape[0], shape[-1]
    params, acts, macs = 0, c_in * s * s, 0
    for i in range(4):
        cin = c_in if i == 0 else channels
        s_conv = math.ceil(s / 2) if variant == "strided" else s
        params += cin * channels * 9 + channels + 2 * channels
        macs += cin * channels * 9 * s_conv * s_conv
        acts += 3 * channels * s_conv * s_conv  # conv, batch-norm, relu outputs
        s = s_conv if variant == "strided" else s_conv // 2
        acts += channels * s * s if variant != "strided" else 0
    feat = channels * max(s, 1) ** 2
    params += (feat + 1) * out_dim
    macs += feat * out_dim
    return params, acts + out_dim, macs


def _mlp(shape, out_dim, hidden):
    dims = [math.prod(shape) or 1, *hidden, out_dim]
    params = sum((a + 1) * b for a, b in zip(dims, dims[1:]))
    return params, dims[0] + 2 * sum(hidden) + out_dim, params


def model_cost(model: dict, shape, out_dim: int) -> tuple:
    """(parameters, activation floats per row, multiply-adds per row) of a ``model`` config on inputs of ``shape``."""
    arch = model["arch"]
    if arch == "conv4":
        return _conv4(shape, out_dim, int(model.get("channels", 64)), model.get("variant", "strided"))
    if arch == "mlp":
        return _mlp(shape, out_dim, model.get("hidden") or [40, 40])
    return out_dim, 3 * out_dim, out_dim  # identity: the parameters are the task's mean


def estimate_job(cfg: dict, dims: dict | None = None) -> Cost:
    """The cost of a validated job config (``JobConfig.model_dump()``); see the module docstring."""
    tasks, model, alg = cfg["tasks"], cfg["model"], cfg["algorithm"]["name"]
    shape, out_dim, rows = _shapes(tasks, dims)
    arch = model["arch"]
    params, acts, macs = model_cost(model, shape, out_dim)
    inner = int((cfg.get("inner") or {}).get("steps") or 5)
    outer = cfg["outer"]
    meta_batch, steps = int(outer["meta_batch"]), int(outer["steps"])
    # phi, log sigma^2, the meta-gradient and Adam's two moments, plus the algorithm's own tensors
    meta = 6 * params
    unrolled = alg in UNROLLED
    copies = (inner + 2) if unrolled else 4  # parameters (and their gradients) alive per task
    data = rows * ((math.prod(shape) or 1) + out_dim)
    # the graph of every inner step, kept for the second-order backward, or of one step. The x3 was calibrated on
    # one ad hoc measurement (a 2 x 512 MLP MAML step, 10 inner steps, 25 tasks of 400 rows) and is not yet checked
    # by a committed benchmark
    act = rows * acts * (3 * (inner + 1) if unrolled else 2)
    floats = meta + meta_batch * (copies * params + data + act)
    step_flops = 6.0 * macs * rows * (inner + 1) * meta_batch  # forward + backward, 2 flops per multiply-add
    run = cfg.get("run") or {}
    ckpt_bytes = FLOAT * 4 * params  # phi, log sigma^2 and the optimizer's moments
    keep = run.get("keep_checkpoints")
    n_ckpt = min(keep + 1, steps) if keep else math.ceil(steps / max(1, int(run.get("checkpoint_every") or steps)))
    drivers = [(["outer", "meta_batch"], meta_batch), (["tasks", "shots"], tasks.get("shots")),
               (["tasks", "query"], tasks.get("query"))]
    if tasks.get("ways") is not None:
        drivers.append((["tasks", "ways"], tasks.get("ways")))
    if arch == "conv4":
        drivers += [(["model", "channels"], model.get("channels")), (["tasks", "image_size"], tasks.get("image_size"))]
    elif arch == "mlp":
        drivers.append((["model", "hidden"], model.get("hidden")))
    drivers.append((["inner", "steps"], inner))
    return Cost(params=params, memory_bytes=int(FLOAT * floats), step_flops=step_flops,
                total_flops=step_flops * steps, checkpoint_bytes=ckpt_bytes * n_ckpt,
                model_bytes=FLOAT * 2 * params, drivers=drivers)


def estimate_adapt(macs: int, rows: int, steps: int) -> float:
    """Flops of one adaptation: forward and backward over ``rows`` (support and query) for every step and the
    prediction; ``macs``: the model's multiply-adds per row (``model_cost``)."""
    return 6.0 * macs * rows * (steps + 1)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"
