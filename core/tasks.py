"""Task families: seeded samplers that return batched tensors with a leading task axis.

Every sampler draws from an explicit ``torch.Generator`` (CPU), so a job's task stream is reproducible
and can be resumed from a saved generator state.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch.nn import functional as F


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


def _uniform(n, lo_hi, g):
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


class Family:
    """A task family. ``kind`` is regression, classification or density; ``loss(pred, y)`` is per task."""

    kind = "regression"
    input_shape: tuple = (1,)
    output_dim: int = 1
    param_dim: int = 0  # identity model only
    transform = None

    def loss(self, pred, y):
        return ((pred - y) ** 2).mean()

    def sample(self, n: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        raise NotImplementedError

    def sampler_state(self) -> dict:
        return {}


class Sinusoid(Family):
    """y = A sin(w x - b); A ~ U[0.1, 5], b ~ U[0, pi], x ~ U[-5, 5] (Finn et al.); w ~ U[frequency] or 1."""

    def __init__(self, shots=10, query=10, amplitude=(0.1, 5.0), phase=(0.0, math.pi), x_range=(-5.0, 5.0),
                 frequency=None):
        self.shots, self.query = shots, query
        self.amplitude, self.phase, self.x_range, self.frequency = amplitude, phase, x_range, frequency

    def sample_functions(self, n, g):
        a = _uniform(n, self.amplitude, g)
        b = _uniform(n, self.phase, g)
        w = _uniform(n, self.frequency, g) if self.frequency else torch.ones(n, dtype=torch.float64)
        return a, b, w

    def sample(self, n, generator, split="train"):
        a, b, w = self.sample_functions(n, generator)
        x = _uniform(n * (self.shots + self.query), self.x_range, generator).view(n, -1, 1)
        y = a.view(n, 1, 1) * torch.sin(w.view(n, 1, 1) * x - b.view(n, 1, 1))
        k = self.shots
        return TaskBatch(x[:, :k].float(), y[:, :k].float(), x[:, k:].float(), y[:, k:].float())


def _swirl(omega):
    def transform(theta):
        pairs = theta.view(-1, 2)
        angle = omega * torch.sqrt((pairs ** 2).sum(-1) + 1e-30)
        c, s = torch.cos(angle), torch.sin(angle)
        rotated = torch.stack([c * pairs[:, 0] - s * pairs[:, 1], s * pairs[:, 0] + c * pairs[:, 1]], -1)
        return rotated.reshape(-1)
    return transform


def _linear(m):
    def transform(theta):
        return torch.cat([theta, theta.sum(0, keepdim=True) / math.sqrt(m)])
    return transform


class HierarchicalNormal(Family):
    """theta_t ~ N(phi, diag(sigma^2)), x_{t,n} ~ N(mu(theta_t), diag(xi^2)) (paper App. A and C).

    The model is ``identity`` (its parameters are theta); the observations are the targets ``y`` and the
    inputs ``x`` are empty placeholders. The loss is the negative log-likelihood summed over observations
    (up to a constant), as in Eq. 12, so that the prior term 1/(2 sigma^2) has the paper's scale.

    - ``univariate`` (App. A): D = 1, xi = 1, phi and sigma^2 from the config.
    - ``linear`` (App. C.1): M = 8, D = 9, phi = 1, sigma = [8]*4 + [2]*4, xi = [8]*4 + [5]*4 + [1],
      mu(theta) = [I_M, 1_M / sqrt(M)]^T theta.
    - ``swirl`` (App. C.2): M = D = 10, phi = 2, sigma = [4]*8 + [8]*2, xi = 10, each consecutive pair
      rotated by omega * ||pair|| with omega = pi / 5.
    """

    kind = "density"
    input_shape = (0,)

    def __init__(self, variant="univariate", shots=10, query=10, phi_true=0.0, sigma2_true=1.0, n_tasks=None,
                 seed=0):
        self.variant, self.shots, self.query, self.n_tasks = variant, shots, query, n_tasks
        if variant == "univariate":
            self.true_phi = torch.tensor([float(phi_true)], dtype=torch.float64)
            self.true_sigma2 = torch.tensor([float(sigma2_true)], dtype=torch.float64)
            self.xi = torch.ones(1, dtype=torch.float64)
            self.transform = None
        elif variant == "linear":
            m = 8
            self.true_phi = torch.ones(m, dtype=torch.float64)
            self.true_sigma2 = torch.tensor([8.0] * 4 + [2.0] * 4, dtype=torch.float64) ** 2
            self.xi = torch.tensor([8.0] * 4 + [5.0] * 4 + [1.0], dtype=torch.float64)
            self.transform = _linear(m)
        elif variant == "swirl":
            self.true_phi = 2.0 * torch.ones(10, dtype=torch.float64)
            self.true_sigma2 = torch.tensor([4.0] * 8 + [8.0] * 2, dtype=torch.float64) ** 2
            self.xi = 10.0 * torch.ones(10, dtype=torch.float64)
            self.transform = _swirl(math.pi / 5)
        else:
            raise ValueError(f"unknown hierarchical_normal variant {variant!r}")
        self.param_dim = self.true_phi.numel()
        self.output_dim = self.xi.numel()
        self._fixed: Optional[TaskBatch] = None
        if n_tasks is not None:
            g = torch.Generator().manual_seed(int(seed) + 7919)  # the fixed training set of T tasks
            self._fixed = self._draw(n_tasks, g)

    def loss(self, pred, y):
        xi = self.xi.to(device=pred.device, dtype=pred.dtype)
        return 0.5 * (((y - pred) / xi) ** 2).sum()

    def _draw(self, n, g):
        d = self.param_dim
        theta = self.true_phi + self.true_sigma2.sqrt() * torch.randn(n, d, generator=g, dtype=torch.float64)
        mu = torch.stack([self.transform(t) for t in theta]) if self.transform else theta
        k = self.shots + self.query
        x = mu.unsqueeze(1) + self.xi * torch.randn(n, k, self.output_dim, generator=g, dtype=torch.float64)
        empty = torch.zeros(n, k, 0, dtype=torch.float64)
        return TaskBatch(empty[:, :self.shots], x[:, :self.shots], empty[:, self.shots:], x[:, self.shots:])

    def sample(self, n, generator, split="train"):
        if self._fixed is None or split != "train":
            return self._draw(n, generator)
        if n >= self.n_tasks:  # the whole fixed set, in order: full-batch meta-gradients
            return self._fixed
        idx = torch.randperm(self.n_tasks, generator=generator)[:n]
        return TaskBatch(*(t[idx] for t in self._fixed))


def build_family(cfg: dict, seed: int = 0) -> Family:
    fam = cfg["family"]
    if fam == "sinusoid":
        return Sinusoid(cfg["shots"], cfg["query"], tuple(cfg["amplitude"]), tuple(cfg["phase"]),
                        tuple(cfg["x_range"]), tuple(cfg["frequency"]) if cfg.get("frequency") else None)
    if fam == "hierarchical_normal":
        return HierarchicalNormal(cfg["variant"], cfg["shots"], cfg["query"], cfg["phi_true"], cfg["sigma2_true"],
                                  cfg.get("n_tasks"), seed)
    raise ValueError(f"unknown task family {fam!r}")


def cross_entropy(pred, y):
    return F.cross_entropy(pred, y)
