"""Preconditioned conjugate gradient on dict-valued vectors, with a matvec function (no matrix).

Stopping rule: exactly ``steps`` iterations (the paper fixes 1-7 CG steps, App. D and Tables 4-9), so the
solver runs unchanged under ``torch.func.vmap``; once the residual vanishes (p^T A p <= 0 or r^T z <= 0)
the remaining iterations change nothing. It returns the residual norm ||b - A x|| and the number of
iterations that made progress, which the trainer logs as metrics instead of failing silently.
"""
from __future__ import annotations

import torch


def _dot(a: dict, b: dict):
    return sum((a[k] * b[k]).sum() for k in a)


def conjugate_gradient(matvec, b: dict, precond_inv: dict | None = None, steps: int = 5):
    def M(r):
        return r if precond_inv is None else {k: precond_inv[k] * r[k] for k in r}

    x = {k: torch.zeros_like(v) for k, v in b.items()}
    r = dict(b)
    z = M(r)
    p = dict(z)
    rz = _dot(r, z)
    tiny = torch.finfo(rz.dtype).tiny
    iters = torch.zeros((), dtype=rz.dtype, device=rz.device)
    for _ in range(steps):
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        active = (pAp > tiny) & (rz > tiny)
        alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        x = {k: x[k] + alpha * p[k] for k in x}
        r = {k: r[k] - alpha * Ap[k] for k in r}
        z = M(r)
        rz_new = _dot(r, z)
        beta = torch.where(active, rz_new / torch.where(active, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        p = {k: z[k] + beta * p[k] for k in p}
        rz = rz_new
        iters = iters + active.to(iters.dtype)
    return x, torch.sqrt(_dot(r, r)), iters
