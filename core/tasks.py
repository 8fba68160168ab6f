"""Task families: seeded samplers that return batched tensors with a leading task axis.

The synthetic families and uploaded regression tasks are here, image classes in ``core.images``; both build on the
base types of ``core.family`` (``Family``, ``TaskBatch``, re-exported here), and ``build_family`` picks one from a
``tasks`` config.

Every sampler draws from an explicit ``torch.Generator`` (CPU), so a job's task stream is reproducible
and can be resumed from a saved generator state.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .family import Family, TaskBatch
from .images import ImageClasses


def _uniform(n, lo_hi, g):
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


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


class Polynomial(Family):
    """y = sum_{i=0}^{order} c_i x^i with c_i ~ U[coefficients] (MT-net Sec. 6.3: U[-1, 1], orders 0..3).

    x ~ U[x_range]; the default (-5, 5) is MT-net's Sec. 6.1 input range, which Sec. 6.3 says it reuses.
    """

    def __init__(self, order=2, shots=10, query=10, coefficients=(-1.0, 1.0), x_range=(-5.0, 5.0)):
        if order < 0:
            raise ValueError(f"polynomial order must be >= 0, got {order}")
        self.order, self.shots, self.query = int(order), shots, query
        self.coefficients, self.x_range = tuple(coefficients), tuple(x_range)

    def sample_functions(self, n, g):
        return _uniform(n * (self.order + 1), self.coefficients, g).view(n, self.order + 1)

    def sample(self, n, generator, split="train"):
        c = self.sample_functions(n, generator)                                  # [n, order + 1]
        x = _uniform(n * (self.shots + self.query), self.x_range, generator).view(n, -1, 1)
        powers = x ** torch.arange(self.order + 1, dtype=torch.float64)          # [n, K, order + 1]
        y = (powers * c.unsqueeze(1)).sum(-1, keepdim=True)
        k = self.shots
        return TaskBatch(x[:, :k].float(), y[:, :k].float(), x[:, k:].float(), y[:, k:].float())


class RegressionTasks(Family):
    """Regression tasks from a fixed collection of per-task point sets (e.g. a user upload).

    ``tasks``: a list of ``(x [N_t, d_in], y [N_t, d_out])`` arrays or tensors. A sampled task is one of
    the split's tasks with ``shots`` support and ``query`` query points drawn without replacement. Tasks
    are split into train / val / test with a fixed seed.
    """

    def __init__(self, tasks, shots=10, query=10, test_fraction=0.2, val_fraction=0.0, split_seed=0):
        self.tasks = [(torch.as_tensor(x, dtype=torch.float32).reshape(len(x), -1),
                       torch.as_tensor(y, dtype=torch.float32).reshape(len(y), -1)) for x, y in tasks]
        if not self.tasks:
            raise ValueError("no tasks")
        self.shots, self.query = int(shots), int(query)
        d_in = {x.shape[1] for x, _ in self.tasks}
        d_out = {y.shape[1] for _, y in self.tasks}
        if len(d_in) != 1 or len(d_out) != 1:
            raise ValueError(f"tasks disagree on input/output dimensions: {sorted(d_in)} / {sorted(d_out)}")
        self.input_shape, self.output_dim = (d_in.pop(),), d_out.pop()
        small = [i for i, (x, _) in enumerate(self.tasks) if x.shape[0] < self.shots + self.query]
        if small:
            raise ValueError(f"tasks {small[:10]} have fewer than shots + query = {self.shots + self.query} points")
        n = len(self.tasks)
        n_test = 0 if test_fraction == 0 else max(1, round(test_fraction * n))
        n_val = 0 if val_fraction == 0 else max(1, round(val_fraction * n))
        if n_test + n_val >= n:
            raise ValueError(f"cannot split {n} tasks with test={test_fraction}, val={val_fraction}")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(split_seed))).tolist()
        self.splits = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}

    def sample(self, n, generator, split="train"):
        pool = self.splits[split]
        if not pool:
            raise ValueError(f"split {split!r} is empty")
        picks = torch.randint(len(pool), (n,), generator=generator).tolist()
        k = self.shots
        out = [[], [], [], []]
        for i in picks:
            x, y = self.tasks[pool[i]]
            idx = torch.randperm(x.shape[0], generator=generator)[: k + self.query]
            for j, t in enumerate((x[idx[:k]], y[idx[:k]], x[idx[k:]], y[idx[k:]])):
                out[j].append(t)
        return TaskBatch(*(torch.stack(t) for t in out))


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
    loss_reduction = "sum"

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


# --------------------------------------------------------------------------- data sources (injected)
# core/ imports only torch/numpy/stdlib, so data sets are handed in by the caller: a loader registered
# under a source name receives the ``tasks`` config dict and returns a dict with ``images`` (uint8
# [classes, per_class, H, W]), ``groups`` (one int per class) and optionally ``class_names``; or, for
# regression sources, ``tasks`` (a list of (x, y) arrays). ``import datasets`` registers "omniglot".
_SOURCES: dict = {}


def register_source(name: str, loader: Callable[[dict], dict]) -> None:
    """Register (or replace) the loader of a data source used by ``image_classes`` / ``regression_dataset``."""
    _SOURCES[name] = loader


def load_source(cfg: dict) -> dict:
    name = cfg.get("source", "omniglot")
    if name not in _SOURCES:
        raise ValueError(f"no loader registered for data source {name!r}: call core.tasks.register_source "
                         f"(for Omniglot: `import datasets`, which registers it); known: {sorted(_SOURCES)}")
    return _SOURCES[name](cfg)


def build_family(cfg: dict, seed: int = 0, data: Optional[dict] = None) -> Family:
    """The task family of a ``tasks`` config. ``data`` (the loader's dict) bypasses the source registry."""
    fam = cfg["family"]
    if fam == "sinusoid":
        return Sinusoid(cfg["shots"], cfg["query"], tuple(cfg["amplitude"]), tuple(cfg["phase"]),
                        tuple(cfg["x_range"]), tuple(cfg["frequency"]) if cfg.get("frequency") else None)
    if fam == "polynomial":
        return Polynomial(cfg["order"], cfg["shots"], cfg["query"], tuple(cfg["coefficients"]), tuple(cfg["x_range"]))
    if fam == "hierarchical_normal":
        return HierarchicalNormal(cfg["variant"], cfg["shots"], cfg["query"], cfg["phi_true"], cfg["sigma2_true"],
                                  cfg.get("n_tasks"), seed)
    if fam == "image_classes":
        data = data if data is not None else load_source(cfg)
        split = cfg.get("split") or {}
        return ImageClasses(data["images"], data.get("groups"), cfg["ways"], cfg["shots"], cfg["query"],
                            cfg.get("image_size"), cfg.get("rotations", False), split.get("by", "class"),
                            split.get("test_fraction", 0.2), split.get("val_fraction", 0.0), split.get("seed", 0),
                            cfg.get("task_mode", "random"), cfg.get("instance_split"), cfg.get("augment"),
                            data.get("class_names"))
    if fam == "regression_dataset":
        data = data if data is not None else load_source(cfg)
        split = cfg.get("split") or {}
        return RegressionTasks(data["tasks"], cfg["shots"], cfg["query"], split.get("test_fraction", 0.2),
                               split.get("val_fraction", 0.0), split.get("seed", 0))
    raise ValueError(f"unknown task family {fam!r}")

