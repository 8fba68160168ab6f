"""The meta-algorithm interface and its registry, the one home both families register into.

``Learner`` is what adapting one task needs (model, loss, partition, inner optimizer); ``Algorithm`` is a per-task
meta-update strategy. The shrinkage family and its special cases (``core.algorithms``) and the comparison algorithms
(``core.baselines``) each register their classes here with ``register``; the trainer builds one with
``build_algorithm``. Neither family imports the other.
"""
from __future__ import annotations

import math

import torch
from torch.func import grad

from .models import apply
from .modules import Partition, per_param, prior_penalty, sigma2
from .optim import Optimizer

ALGORITHMS: dict = {}


def register(*names):
    """Class decorator: ``@register("maml", "fomaml")`` makes ``build_algorithm`` build the class for those names."""
    def deco(cls):
        for n in names:
            if n in ALGORITHMS:
                raise ValueError(f"algorithm {n!r} registered twice")
            ALGORITHMS[n] = cls
        return cls
    return deco


def build_algorithm(cfg: dict, learner: "Learner") -> "Algorithm":
    try:
        cls = ALGORITHMS[cfg["name"]]
    except KeyError:
        raise ValueError(f"unknown algorithm {cfg['name']!r}") from None
    return cls(learner, cfg)


class Learner:
    """What adapting one task needs: the model, its loss, the partition and the inner optimizer."""

    def __init__(self, model, family, partition: Partition, inner: Optimizer, inner_steps: int,
                 lr: float | None = None):
        self.model, self.family, self.partition = model, family, partition
        self.inner, self.inner_steps = inner, inner_steps
        self.lr = lr  # the inner step size as a number (algorithms with their own inner rule read it)

    def data_loss(self, params, x, y):
        return self.family.loss(apply(self.model, params, x), y)

    def lam_modules(self, log_sigma2, xs):
        """Per-module lambda_m = w / sigma_m^2 for a support set ``xs``, with w the family's ``prior_weight``
        (1 / n for a loss averaged over the n support examples: Eq. 4's balance, see ``Family.prior_weight``)."""
        return self.family.prior_weight(xs.shape[0]) / sigma2(log_sigma2)

    def lam(self, log_sigma2, xs):
        """Per-parameter-tensor lambda (``lam_modules`` broadcast to the parameters)."""
        return per_param(self.partition, self.lam_modules(log_sigma2, xs))

    def adapt(self, phi, lam, xs, ys, steps=None, first_order=False, autograd=False):
        """Run the inner optimizer from theta = phi. Differentiable w.r.t. phi and lam unless first_order
        (then inner gradients are treated as constants). Without an enclosing transform it keeps no graph.

        ``autograd``: take the inner gradients with ``torch.autograd.grad`` (``create_graph`` unless first_order)
        instead of ``torch.func.grad``, for callers that differentiate with plain autograd (phi and lam built from
        leaves that require grad; see ``Backprop.eager_task_update``). The same numbers, less Python per op."""
        inner = self.inner

        def objective(theta):
            loss = self.data_loss(theta, xs, ys)
            if lam is not None and not inner.proximal:
                loss = loss + prior_penalty(theta, phi, lam)
            return loss

        if autograd:
            # theta_0 a view of phi, not phi itself: the inner gradient is the partial derivative in theta with
            # phi held fixed (as torch.func.grad of ``objective`` gives it), not the total derivative in the leaf
            theta = {k: v.view_as(v) for k, v in phi.items()}
        else:
            theta = dict(phi)
        state = inner.init(theta)
        for _ in range(self.inner_steps if steps is None else steps):
            if autograd:
                names = list(theta)
                g = dict(zip(names, torch.autograd.grad(objective(theta), [theta[k] for k in names],
                                                        create_graph=not first_order, materialize_grads=True)))
            else:
                g = grad(objective)(theta)
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            theta, state = inner.update(g, state, theta, phi, lam)
        return theta


class Algorithm:
    """A per-task meta-update strategy.

    Extension points for algorithms that own meta-learned tensors besides phi and log sigma^2 (Meta-SGD's
    learning rates, T-net's T, ...; see ``core.baselines``): ``init_extra(phi)`` returns them as a flat
    ``{name: Tensor}`` dict that the trainer keeps in ``meta["extra"]`` (only when it is non-empty, so the
    shrinkage family's meta dict is unchanged), descends with the outer optimizer at ``outer.lr_extra``,
    checkpoints and hands to ``MetaModel``; ``task_update`` then returns ``delta["extra"]`` too.
    ``noise(n, generator, dtype, device)`` returns per-task random tensors (leading task axis) drawn from the
    job's generator that the trainer passes to ``task_update`` after the four data tensors (so vmap works and
    a resumed job replays the same stream). ``custom_adapt`` algorithms also provide the adaptation rule
    that ``MetaModel.adapt`` runs at meta-test (see ``core.baselines.Unrolled``).
    """
    name = ""
    learns_sigma = False   # log sigma^2 is meta-learned
    uses_prior = False     # adaptation is regularised toward phi with the prior's sigma^2
    custom_adapt = False   # MetaModel.adapt uses this algorithm's own inner rule
    thread_safe = True     # eager_task_update may run for several tasks at once on parallel threads

    def __init__(self, learner: Learner, cfg: dict):
        self.learner, self.cfg = learner, cfg

    def prepare_phi(self, phi: dict) -> dict:
        """Adjust the freshly initialised phi (e.g. a head that starts at 0)."""
        return phi

    def init_extra(self, phi: dict) -> dict:
        return {}

    def project_extra(self, extra: dict) -> dict:
        """Called after every outer update of the extra tensors (e.g. to keep them in a valid range)."""
        return extra

    def noise(self, n_tasks: int, generator: torch.Generator, dtype, device) -> tuple:
        return ()

    def init_log_sigma2(self, n_modules: int, dtype, device) -> torch.Tensor:
        if self.learns_sigma:
            value = math.log(self.cfg["init_sigma2"])
        elif self.name == "imaml":
            value = -math.log(self.cfg["lam"])
        else:
            value = 0.0  # unused: no prior
        return torch.full((n_modules,), value, dtype=dtype, device=device)

    def _lam(self, meta, xs):
        return self.learner.lam(meta["log_sigma2"], xs) if self.uses_prior else None

    def task_update(self, meta, xs, ys, xq, yq):
        raise NotImplementedError

    def eager_task_update(self, meta, *args):
        """``task_update`` for one task outside any torch.func transform or compilation (the trainer's per-task
        loop): an algorithm may override it with a cheaper eager form of the same function."""
        return self.task_update(meta, *args)
