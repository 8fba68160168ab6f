"""The task-family base types: ``TaskBatch`` (a batch of tasks with a leading task axis) and ``Family`` (a seeded
sampler of them). The synthetic families (``core.tasks``) and the image families (``core.images``) build on these.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class TaskBatch(NamedTuple):
    xs: torch.Tensor  # [B, K, *input_shape]   support inputs
    ys: torch.Tensor  # [B, K, *target_shape]  support targets
    xq: torch.Tensor  # [B, Q, *input_shape]   query inputs
    yq: torch.Tensor  # [B, Q, *target_shape]  query targets

    def to(self, device=None, dtype=None) -> "TaskBatch":
        def cast(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return TaskBatch(*(cast(t) for t in self))

    def task(self, i: int) -> "TaskBatch":
        return TaskBatch(*(t[i] for t in self))


class Family:
    """A task family. ``kind`` is regression, classification or density; ``loss(pred, y)`` is per task."""

    kind = "regression"
    input_shape: tuple = (1,)
    output_dim: int = 1
    param_dim: int = 0  # identity model only
    transform = None
    loss_reduction = "mean"  # "mean" over a task's examples, or "sum" (the negative log-likelihood of Eq. 4)

    def loss(self, pred, y):
        return ((pred - y) ** 2).mean()

    def prior_weight(self, n_examples: int) -> float:
        """The factor on the prior's precision that keeps Eq. 4's balance for this family's loss.

        Eq. 4 puts the task's summed negative log-likelihood beside -log N(theta | phi, sigma^2 I). A loss that
        is the *mean* over the task's n examples is that sum divided by n, so the same minimiser (and the same
        meaning of sigma^2) needs the prior divided by n too: lambda_m = 1 / (n sigma_m^2). Families whose loss
        is already a sum (``hierarchical_normal``) use lambda_m = 1 / sigma_m^2. ``n_examples`` is the size of
        the set being adapted to (the support set; at meta-test whatever the user sends).

        A regression loss averages the squared error over all n x output_dim elements, so the sum it stands for is
        divided by n x output_dim, and so is the prior (a d-output regression would otherwise carry a prior d times
        too strong). A classification loss averages over the n examples only."""
        if self.loss_reduction != "mean":
            return 1.0
        return 1.0 / (n_examples * (self.output_dim if self.kind == "regression" else 1))

    def sample(self, n: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        raise NotImplementedError

    def sampler_state(self) -> dict:
        return {}
