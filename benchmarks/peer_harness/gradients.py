"""Measurement 1 of the peer harness: the gradient match. On one fixed float64 batch, every contender's meta-gradient
(phi and log sigma^2) and its parameters after one whole outer step, against ours: the timings compare the same
computation only if these agree to ~1e-12."""
from __future__ import annotations

import torch

from .contenders import Ours, build_peer


def maxdiff(a: dict, b: dict) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def gradient_check(workload, alg, peers, meta_batch=None, steps=None, seed=1234) -> dict:
    """float64, one fixed batch: each peer's meta-gradient and one whole outer step against ours'."""
    ours = Ours(workload, alg, "float64", meta_batch, steps)
    g = torch.Generator().manual_seed(seed)
    batch = ours.trainer.family.sample(ours.trainer.config["outer"]["meta_batch"], g).to("cpu", torch.float64)
    ref_phi, ref_ls = ours.meta_grad(batch)
    scale = max(float(v.abs().max()) for v in ref_phi.values())
    out = {"workload": workload, "alg": alg, "meta_batch": batch.xs.shape[0], "inner_steps": ours.trainer.learner.inner_steps,
           "grad_scale": scale, "log_sigma2_grad_scale": float(ref_ls.abs().max()), "peers": {}}
    contenders = {name: build_peer(name, workload, alg, ours, torch.float64) for name in peers}
    for name, p in contenders.items():
        gp, gl = p.meta_grad(batch)
        out["peers"][name] = {"grad_phi": maxdiff(gp, ref_phi),
                              "grad_log_sigma2": float((gl - ref_ls).abs().max())}
    ours.step(batch)
    phi1, ls1 = ours.params()
    for name, p in contenders.items():
        p.step(batch)
        pp, pl = p.params()
        out["peers"][name]["step_phi"] = maxdiff({k: v.detach() for k, v in pp.items()}, phi1)
        out["peers"][name]["step_log_sigma2"] = float((pl.detach() - ls1).abs().max())
    return out
