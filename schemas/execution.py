"""The ``execution`` and ``run`` sections: how a job runs (vectorisation, compilation, device, ranks) and when it
writes progress, checkpoints and validations."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .types import CompileSwitch, Int, OptInt, Strict


class Execution(Strict):
    vectorize: Literal["auto", "vmap", "loop"] = Field(
        "auto", description="adapt the tasks of a meta-batch with torch.func.vmap or a per-task loop (on CPU its "
        "tasks run on parallel threads, one per CPU of the worker: METASHRINK_TASK_THREADS); auto measures both on "
        "the first step"
    )
    compile: CompileSwitch = Field(
        "auto", description="torch.compile the meta-step (vmap: the whole meta-step; loop: one task's update). "
        "\"auto\": time a few eager steps, compile only when the eager time left in the job repays the expected "
        "compile time (25-70 s cold on 2 CPU cores; seconds when this worker's compile cache holds the job's "
        "shape), and keep the compiled step only if it is faster; the decision and the compile time are reported "
        "with the job (startup) and kept by its checkpoints")
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(
        False, description="mixed precision for conv nets (model.arch conv4, dtype float32): the convolutions run "
        "under bfloat16 autocast on the job's device, in training and in every adapt of the published model; "
        "batch-norm, the head, the losses, the inner and outer updates and the stored parameters stay float32. "
        "Off by default; a speed option for GPUs with bf16 tensor cores (on CPUs it is usually slower)")
    world_size: Int = Field(
        1, ge=1, le=1024, description="ranks (processes) that train this one job with torch.distributed: the worker "
        "that claims it launches them (gloo on CPU, NCCL on GPUs, one GPU per rank); each rank adapts a disjoint "
        "share of the same meta-batch a world_size 1 job draws for the seed, and the finite tasks' update sums and "
        "counts are all-reduced, so the result equals world_size 1 up to float reduction order. At most "
        "outer.meta_batch, and at most the workers' METASHRINK_MAX_WORLD_SIZE per node (422 above it)")
    nodes: Int = Field(
        1, ge=1, le=1024, description="machines the world_size ranks are spread over (world_size / nodes each): the "
        "claiming worker is node 0 and hosts the rendezvous, join workers (queue 'join') on other machines start "
        "the other nodes' ranks. More than 1 only where the deployment allows it (METASHRINK_MAX_NODES, default 1: "
        "422 above it)")

    @model_validator(mode="after")
    def _ranks(self):
        if self.world_size % self.nodes:
            raise ValueError(f"execution.world_size ({self.world_size}) must be a multiple of execution.nodes "
                             f"({self.nodes}): every node runs world_size / nodes ranks")
        return self


class Run(Strict):
    """When the worker writes progress. With ``validate_every`` the job also holds out the family's ``val`` split
    (early stopping, as the papers do): every ``validate_every`` meta-steps and at the last one the current
    meta-model is adapted on ``validation_tasks`` validation tasks (the same tasks each time, from a generator
    of its own seeded from the job seed, so the training RNG stream is untouched and resume stays bit for bit)
    for ``validation_steps`` inner steps; the query metric is recorded as the series ``val_mse`` /
    ``val_accuracy`` / ``val_loss``, a checkpoint is written at each validation, the best one (lowest loss,
    highest accuracy) is marked, training stops after ``patience`` validations without improvement, and the
    job publishes the best checkpoint's meta-model instead of the last. Image and uploaded-regression
    families need ``tasks.split.val_fraction > 0``; sinusoid, polynomial and hierarchical_normal draw fresh
    validation tasks."""

    checkpoint_every: Int = Field(100, ge=1)
    keep_checkpoints: OptInt = Field(
        None, ge=1, le=1000, description="checkpoints kept on disk: the latest n (and the best validated one); older "
        "ones are deleted as new ones are written. None = the deployment's METASHRINK_KEEP_CHECKPOINTS (default 3)")
    module_map_every: Int = Field(50, ge=1)
    log_every: Int = Field(10, ge=1)
    validate_every: OptInt = Field(
        None, ge=1, description="meta-steps between validations on the val split; None = no validation")
    validation_tasks: Int = Field(100, ge=1, le=10000, description="validation tasks per validation")
    validation_steps: OptInt = Field(
        None, ge=0, le=10000, description="adaptation steps on each validation task; None = inner.steps")
    validation_modules: Literal["all", "selected"] = Field(
        "selected", description="modules adapted during validation: selected (the default everywhere: every "
        "module under its learned prior unless sigma^2 separated, modules.selection) or all")
    patience: OptInt = Field(
        None, ge=1, description="stop after this many validations without improvement; None = never stop early")
    min_delta: float = Field(0.0, ge=0, allow_inf_nan=False,
                             description="an improvement must beat the best score by more than this")

    @model_validator(mode="after")
    def _validation(self):
        if self.validate_every is None and self.patience is not None:
            raise ValueError("patience needs validate_every")
        return self
