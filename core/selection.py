"""Task-specific module selection from the learned sigma^2 (Sec. 4.3): the rules a published model applies.

A validation-scored choice (score the prefixes of the sigma^2 ranking on meta-validation tasks) is
``core.evaluation.validated_selection``: it needs tasks, so it lives beside ``evaluate``.
"""
from __future__ import annotations

import math

import torch

MIN_GAP = math.log(100.0)  # Sec. 4.3: task-independent sigma^2 "at least two orders of magnitude smaller"


def selection(names, log_sigma2: torch.Tensor, method: str = "gap", threshold: float = 1e-3, k: int = 1,
              min_gap: float = MIN_GAP) -> dict:
    """Task-specific modules from the learned sigma^2 (Sec. 4.3), and why.

    ``gap``: sort log sigma^2 in decreasing order and find the largest gap between neighbours. Only when that
    gap is at least ``min_gap`` (default ln 100: the paper's "two orders of magnitude") are the modules above
    it selected; otherwise sigma^2 has not separated and *every* module is task-specific (each still adapts
    under its own learned prior). ``threshold``: sigma_m^2 > threshold. ``topk``: the k largest.

    Returns ``{"method", "selected", "gap", "min_gap", "separated"}``: ``gap`` is the largest gap in
    log sigma^2 (natural log; 0 for one module), ``separated`` whether the rule picked a strict subset.
    """
    ls = log_sigma2.detach().double().cpu()
    order = torch.argsort(ls, descending=True).tolist()
    gaps = [float(ls[order[i]] - ls[order[i + 1]]) for i in range(len(order) - 1)]
    gap = max(gaps, default=0.0)
    if method == "threshold":
        chosen = [i for i in order if float(ls[i].exp()) > threshold]
    elif method == "topk":
        chosen = order[:k]
    elif method == "gap":
        chosen = order[: 1 + gaps.index(gap)] if gaps and gap >= min_gap else order
    else:
        raise ValueError(f"unknown selection method {method!r}")
    return {"method": method, "selected": [names[i] for i in sorted(chosen)], "gap": gap, "min_gap": float(min_gap),
            "separated": 0 < len(chosen) < len(order)}


def select_modules(names, log_sigma2: torch.Tensor, method: str = "gap", threshold: float = 1e-3, k: int = 1,
                   min_gap: float = MIN_GAP) -> list:
    """The selected module names of ``selection``."""
    return selection(names, log_sigma2, method, threshold, k, min_gap)["selected"]
