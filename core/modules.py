"""Module partitions and the shrinkage prior N(phi_m, sigma_m^2 I) over them (paper Sec. 3)."""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch

SIGMA2_MIN, SIGMA2_MAX = 1e-5, 1e5  # App. D.2 clipping range
LOG_SIGMA2_MIN, LOG_SIGMA2_MAX = math.log(SIGMA2_MIN), math.log(SIGMA2_MAX)


class PartitionError(ValueError):
    pass


@dataclass(frozen=True)
class Partition:
    """Every parameter belongs to exactly one module; sigma^2 is learned per module."""

    names: tuple          # module names, in order
    index: dict           # parameter name -> module index
    sizes: tuple          # number of parameters per module

    def members(self, m: int) -> list:
        return [p for p, i in self.index.items() if i == m]

    def param_names(self, modules) -> list:
        """Parameter names of the given module names."""
        wanted = {self.names.index(m) for m in modules}
        return [p for p, i in self.index.items() if i in wanted]


def _layer_of(param_name: str) -> str:
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def build_partition(params: dict, kind: str = "per_layer", groups: dict | None = None) -> Partition:
    """``per_layer``: a layer's weight and bias form one module (each batch-norm layer is a module);
    ``per_tensor``: one module per parameter tensor; ``groups``: user modules by fnmatch patterns."""
    if kind == "per_tensor":
        assign = {p: p for p in params}
    elif kind == "per_layer":
        assign = {p: _layer_of(p) for p in params}
    elif kind == "groups":
        assign = {}
        for p in params:
            hits = [g for g, pats in (groups or {}).items() if any(fnmatch.fnmatchcase(p, pat) for pat in pats)]
            if len(hits) > 1:
                raise PartitionError(f"parameter {p!r} matches more than one module: {sorted(hits)}")
            if not hits:
                raise PartitionError(f"parameter {p!r} matches no module; parameters are {sorted(params)}")
            assign[p] = hits[0]
        empty = [g for g in (groups or {}) if g not in assign.values()]
        if empty:
            raise PartitionError(f"modules {empty} match no parameter; parameters are {sorted(params)}")
    else:
        raise PartitionError(f"unknown partition {kind!r}")
    names = tuple(dict.fromkeys(assign[p] for p in params))
    index = {p: names.index(assign[p]) for p in params}
    sizes = tuple(sum(params[p].numel() for p in params if index[p] == m) for m in range(len(names)))
    return Partition(names, index, sizes)


def sigma2(log_sigma2: torch.Tensor) -> torch.Tensor:
    """sigma^2 = exp(log sigma^2), clipped to [1e-5, 1e5] (App. D.2)."""
    return log_sigma2.clamp(LOG_SIGMA2_MIN, LOG_SIGMA2_MAX).exp()


def per_param(partition: Partition, values: torch.Tensor, names=None) -> dict:
    """Broadcast one value per module to a dict keyed by parameter name."""
    return {p: values[partition.index[p]] for p in (names if names is not None else partition.index)}


def prior_penalty(theta: dict, phi: dict, lam: dict) -> torch.Tensor:
    """sum_m ||theta_m - phi_m||^2 / (2 sigma_m^2), with lam = 1 / sigma^2 per parameter tensor."""
    return sum(0.5 * lam[p] * ((theta[p] - phi[p]) ** 2).sum() for p in theta)


def inverse_gamma_penalty(log_sigma2: torch.Tensor, beta: float, alpha: float = 1.0) -> torch.Tensor:
    """The weak regulariser on sigma^2 of App. D.2, Eq. 49, as a term *added to the minimised objective*.

    Eq. 49 writes ``(1/T) l_PLL + beta log IG(sigma^2)`` with IG of shape alpha = 1 and scale beta. Read
    literally (adding +beta * log IG to a loss that is minimised) the term -(alpha+1) log sigma^2 - beta/sigma^2
    would reward *large* sigma^2 without bound. The paper's stated purpose is the opposite ("encourage its
    components to be small unless nonzero values are supported by evidence"), which is MAP estimation of
    sigma^2 under an IG(alpha, beta) prior: add the *negative* log-density,
        beta * [ (alpha + 1) log sigma^2 + beta / sigma^2 ]    (constants dropped),
    weighted by beta as in Eq. 49. Its gradient with respect to log sigma^2, beta * ((alpha + 1) - beta / sigma^2),
    is positive for every sigma^2 > beta / (alpha + 1), so gradient descent shrinks sigma^2 toward that mode
    (5e-6 for beta = 1e-5) unless the predictive likelihood pays for a larger value.
    """
    s2 = sigma2(log_sigma2)
    return beta * ((alpha + 1.0) * torch.log(s2) + beta / s2).sum()
