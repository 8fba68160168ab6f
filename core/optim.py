"""Optimizers as pure ``(init, update)`` pairs with explicit state (optax style).

``update(grads, state, params, center=None, lam=None, lr=None) -> (params, state)``. ``center``/``lam`` are
the prior mean phi and the per-tensor L2 scale lambda = 1 / sigma_m^2. Non-proximal optimizers ignore them
(the prior term is then part of the loss whose gradient they get); proximal ones apply it in the prox
step (paper App. D.3, Alg. 2 and 3) and take the gradient of the data loss only. ``lr`` overrides the
configured step size (schedules). All operations are out-of-place, so they compose with torch.func.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch


class Optimizer(NamedTuple):
    init: Callable
    update: Callable
    proximal: bool
    name: str


def _prox(theta_half, center, lam, step):
    # argmin_theta ||theta - theta_half||^2 / (2 step) + lam ||theta - center||^2 / 2
    return (theta_half - center) / (1.0 + lam * step) + center


def sgd(lr: float) -> Optimizer:
    def init(params):
        return {}

    def update(grads, state, params, center=None, lam=None, lr=None):
        a = lr_ if lr is None else lr
        return {p: params[p] - a * grads[p] for p in params}, state

    lr_ = lr
    return Optimizer(init, update, False, "sgd")


def proximal_gd(lr: float) -> Optimizer:
    """Alg. 2: theta_1/2 = theta - a g; theta <- (theta_1/2 - phi) / (1 + lam a) + phi."""
    def init(params):
        return {}

    def update(grads, state, params, center=None, lam=None, lr=None):
        a = lr_ if lr is None else lr
        new = {}
        for p in params:
            half = params[p] - a * grads[p]
            new[p] = half if lam is None else _prox(half, center[p], lam[p], a)
        return new, state

    lr_ = lr
    return Optimizer(init, update, True, "proximal_gd")


def _adam(lr, betas, eps, proximal):
    b1, b2 = betas

    def init(params):
        ref = next(iter(params.values()))
        return {"t": torch.zeros((), dtype=ref.dtype, device=ref.device),
                "m": {p: torch.zeros_like(v) for p, v in params.items()},
                "v": {p: torch.zeros_like(v) for p, v in params.items()}}

    def update(grads, state, params, center=None, lam=None, lr=None):
        a = lr_ if lr is None else lr
        t = state["t"] + 1
        m = {p: b1 * state["m"][p] + (1 - b1) * grads[p] for p in params}
        v = {p: b2 * state["v"][p] + (1 - b2) * grads[p] ** 2 for p in params}
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        new = {}
        for p in params:
            vhat = v[p] / c2
            # clamp_min: sqrt has an infinite derivative at 0 (a parameter whose gradient is exactly 0, such
            # as a conv bias before batch-norm, would make second-order meta-gradients NaN)
            half = params[p] - a * (m[p] / c1) / (vhat.clamp_min(torch.finfo(vhat.dtype).tiny).sqrt() + eps)
            if proximal and lam is not None:
                # Alg. 3: the prox step uses the Adam-scaled step size a / sqrt(v_hat + eps)
                half = (half - center[p]) / (1.0 + lam[p] * a / torch.sqrt(vhat + eps)) + center[p]
            new[p] = half
        return new, {"t": t, "m": m, "v": v}

    lr_ = lr
    return Optimizer(init, update, proximal, "proximal_adam" if proximal else "adam")


def adam(lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> Optimizer:
    return _adam(lr, betas, eps, False)


def proximal_adam(lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> Optimizer:
    return _adam(lr, betas, eps, True)


def build_optimizer(name: str, lr: float, betas=(0.9, 0.999), eps: float = 1e-8) -> Optimizer:
    if name == "sgd":
        return sgd(lr)
    if name == "proximal_gd":
        return proximal_gd(lr)
    if name == "adam":
        return adam(lr, tuple(betas), eps)
    if name == "proximal_adam":
        return proximal_adam(lr, tuple(betas), eps)
    raise ValueError(f"unknown optimizer {name!r}")


def flatten_state(state, prefix: str) -> dict:
    """Optimizer state -> flat ``{name: tensor}`` for checkpoints."""
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(flatten_state(v, f"{prefix}.{k}"))
    else:
        out[prefix] = state
    return out


def unflatten_state(template, flat: dict, prefix: str):
    if isinstance(template, dict):
        return {k: unflatten_state(v, flat, f"{prefix}.{k}") for k, v in template.items()}
    return flat[prefix].clone()
