"""Meta-test evaluation: adapt on held-out tasks for a schedule of steps, with 95% confidence intervals.

``evaluate`` adapts every task once, to ``max(steps)``, and records the query metric at each requested step
on the way (step 0 = phi itself, before adaptation). The adaptation is exactly ``MetaModel.adapt``'s: the
same inner optimizer, learning rate, per-module prior (lambda = 1 / sigma_m^2 for the algorithms with a
prior, proximal or in the loss as the optimizer requires) and only the chosen modules move, the rest stay
at phi. Tasks of a chunk are adapted together with ``torch.func.vmap`` (a per-task loop is the fallback for
models without batching rules). All module choices see the same tasks (a paired comparison).

Metric: classification -> query ``accuracy``; regression -> query ``mse`` (the family's loss); density ->
the family's query ``loss`` (negative log-likelihood up to a constant). ``ci95`` is the half-width
t_{0.975, n-1} * s / sqrt(n) with s the sample standard deviation (ddof = 1) of the per-task metric over the n
tasks: Student's t, so the interval keeps its 95% coverage at the n = 3-10 seeds of a reproduction script as well
as at hundreds of tasks (where t -> 1.96).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence, Union

import torch
from torch.func import grad, vmap

from .adapt import NonFiniteError
from .modules import prior_penalty
from .optim import build_optimizer

DEFAULT_STEPS = (0, 1, 5, 10, 50)
Z95 = 1.959963984540054
# t_{0.975, df} for df = 1..30 (exact to 4 decimals); above 30 the Cornish-Fisher expansion in 1/df (error < 1e-4)
_T975 = (12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281, 2.2010, 2.1788, 2.1604,
         2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860, 2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555,
         2.0518, 2.0484, 2.0452, 2.0423)


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95% intervals)."""
    if df < 1:
        raise ValueError("df must be >= 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = Z95
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def mean_ci(values) -> dict:
    """Mean, 95% CI half-width (t_{0.975, n-1} * sample std / sqrt(n)), sample std (ddof = 1) and n."""
    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = v.numel()
    if n == 0:
        raise ValueError("no values")
    std = float(v.std(unbiased=True)) if n > 1 else float("nan")
    return {"mean": float(v.mean()), "ci95": t975(n - 1) * std / math.sqrt(n) if n > 1 else float("nan"),
            "std": std, "n": n}


def paired(a, b) -> dict:
    """``mean_ci`` of the paired differences a - b (same tasks or same seeds in the same order)."""
    a, b = (torch.as_tensor(x, dtype=torch.float64).flatten() for x in (a, b))
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.numel()} vs {b.numel()}")
    return mean_ci(a - b)


def metric_name(kind: str) -> str:
    return {"classification": "accuracy", "regression": "mse"}.get(kind, "loss")


def _module_choices(meta_model, modules) -> list:
    """[(label, [module names])]."""
    if modules == "each":
        return [(m, [m]) for m in meta_model.partition.names]
    if isinstance(modules, str) and modules in ("selected", "all"):
        return [(modules, meta_model.resolve_modules(modules))]
    chosen = meta_model.resolve_modules(modules)
    return [("+".join(chosen), chosen)]


class _Adapter:
    """Batched replica of ``MetaModel.adapt`` that reports the query metric at chosen steps."""

    def __init__(self, meta_model, names: list, lr: Optional[float]):
        mm = meta_model
        inner = mm.config["inner"]
        self.mm = mm
        self.opt = build_optimizer(inner["optimizer"], lr or inner["lr"], inner["betas"], inner["eps"])
        self.names = names
        self.lam = None  # set per batch: lambda depends on the support-set size (``MetaModel.lam``)
        self.frozen = {k: v for k, v in mm.phi.items() if k not in names}
        self.center = {k: mm.phi[k] for k in names}
        self.kind = mm.kind

    def _objective(self, theta, xs, ys):
        loss = self.mm.loss({**self.frozen, **theta}, xs, ys)
        if self.lam and not self.opt.proximal:
            loss = loss + prior_penalty(theta, self.center, self.lam)
        return loss

    def _metric(self, theta, xq, yq):
        pred = self.mm.forward({**self.frozen, **theta}, xq)
        if self.kind == "classification":
            return (pred.argmax(-1) == yq).to(pred.dtype).mean()
        return self.mm.family.loss(pred, yq)

    def _map(self, fn, theta, *data, use_vmap):
        if use_vmap:
            return vmap(fn)(theta, *data)
        outs = [fn({k: v[i] for k, v in theta.items()}, *(d[i] for d in data)) for i in range(data[0].shape[0])]
        return torch.utils._pytree.tree_map(lambda *t: torch.stack(t), *outs)

    def run_metamodel(self, batch, steps: Sequence[int], names: list, lr) -> torch.Tensor:
        """The reference path: ``MetaModel.adapt`` per task with its ``on_step`` hook (no vmap)."""
        xs, ys, xq, yq = batch
        want, cols = set(steps), []
        for i in range(xs.shape[0]):
            out = {}

            def record(step, params, i=i, out=out):
                if step in want:
                    with torch.no_grad():
                        out[step] = self._metric({k: params[k] for k in self.center}, xq[i], yq[i])
            try:  # a task whose adaptation diverges keeps the steps before it; later ones are NaN (counted)
                self.mm.adapt(xs[i], ys[i], steps=max(steps), modules=names, lr=lr, on_step=record)
            except NonFiniteError:  # not finite before the first step
                out.clear()
            nan = torch.tensor(float("nan"), dtype=xs.dtype, device=xs.device)
            cols.append(torch.stack([out[t] if t in out and bool(torch.isfinite(out[t])) else nan for t in steps]))
        return torch.stack(cols, 1)

    def run(self, batch, steps: Sequence[int], use_vmap: bool) -> torch.Tensor:
        """Per-task query metric [len(steps), B] at each of ``steps`` (sorted, distinct)."""
        xs, ys, xq, yq = batch
        b = xs.shape[0]
        self.lam = self.mm.lam(self.names, xs.shape[1])
        theta = {k: v.unsqueeze(0).expand(b, *v.shape).clone() for k, v in self.center.items()}
        state = self.opt.init(theta) if theta else {}
        want, out = set(steps), {}
        for t in range(max(steps) + 1):
            if t in want:
                with torch.no_grad():
                    out[t] = self._map(self._metric, theta, xq, yq, use_vmap=use_vmap).detach()
            if t == max(steps) or not theta:
                continue
            grads = self._map(grad(self._objective), theta, xs, ys, use_vmap=use_vmap)
            with torch.no_grad():
                theta, state = self.opt.update(grads, state, theta, self.center, self.lam)
        if not theta:  # nothing adapts: the metric is the same at every step
            out = {t: out[0] if 0 in out else self._map(self._metric, theta, xq, yq, use_vmap=use_vmap) for t in steps}
        return torch.stack([out[t] for t in steps])


def evaluate(meta_model, family=None, n_tasks: int = 600, steps: Iterable[int] = DEFAULT_STEPS,
             modules: Union[str, Sequence[str]] = "selected", split: str = "test",
             generator: Optional[torch.Generator] = None, seed: int = 0, batch_size: int = 25,
             lr: Optional[float] = None, vectorize: str = "auto", progress=None) -> dict:
    """Adapt ``meta_model`` (a ``core.MetaModel``) on ``n_tasks`` tasks of ``family`` (default: the model's
    own family) drawn from ``split``; see the module docstring.

    ``modules``: "selected" (the learned task-specific modules), "all", "each" (one module at a time) or a
    list of module names. ``lr`` overrides the inner learning rate. ``vectorize``: "auto"/"vmap" adapt a chunk
    of tasks together with torch.func.vmap (fallback: loop), "loop" one task at a time with the same batched
    code, "adapt" through ``MetaModel.adapt(on_step=...)`` itself (the reference path, slowest). ``progress(done, total)`` is called
    after each chunk of tasks. Returns ``{"metric", "split", "n_tasks", "steps", "ci": ..., "results":
    [{"step", "modules", "adapted", "mean", "ci95", "std", "n"}]}``.
    """
    family = family if family is not None else meta_model.family
    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 0:
        raise ValueError("steps must be a non-empty list of non-negative integers")
    from .adapt import MAX_ADAPT_STEPS
    if steps[-1] > MAX_ADAPT_STEPS:
        raise ValueError(f"steps must be at most {MAX_ADAPT_STEPS}")
    if n_tasks < 1:
        raise ValueError("n_tasks must be >= 1")
    generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    choices = _module_choices(meta_model, modules)
    per_task, used = _per_task(meta_model, family, n_tasks, steps, choices, split, generator, batch_size, lr,
                               vectorize, progress)
    results = []
    for label, names in choices:
        vals = per_task[label]  # [len(steps), n_tasks]
        for i, s in enumerate(steps):
            ok = torch.isfinite(vals[i])  # a diverged task is counted, never averaged in as NaN
            stats = mean_ci(vals[i][ok]) if bool(ok.any()) else {"mean": float("nan"), "ci95": float("nan"),
                                                                  "std": float("nan"), "n": 0}
            results.append({"step": s, "modules": label, "adapted": list(names), **stats,
                            "diverged": int((~ok).sum())})
    return {"metric": metric_name(meta_model.kind), "split": split, "n_tasks": int(n_tasks), "steps": steps,
            "ci": "95% half-width = t(0.975, n-1) * sample std (ddof=1) over tasks / sqrt(n_tasks)",
            "vectorize": used, "results": results}


def _per_task(meta_model, family, n_tasks, steps, choices, split, generator, batch_size, lr, vectorize, progress):
    """{label: per-task query metric [len(steps), n_tasks]} for each (label, module names) of ``choices``, every
    choice on the same tasks; and the vectorisation used."""
    adapters = [(label, names, _Adapter(meta_model, meta_model.partition.param_names(names), lr))
                for label, names in choices]
    per_task = {label: [] for label, _, _ in adapters}
    use_vmap = vectorize in ("auto", "vmap")
    done = 0
    while done < n_tasks:
        b = min(batch_size, n_tasks - done)
        batch = family.sample(b, generator, split).to(meta_model.device, meta_model.dtype)
        for label, names, ad in adapters:
            if vectorize == "adapt" or meta_model.rule is not None:  # an algorithm's own rule: MetaModel.adapt
                per_task[label].append(ad.run_metamodel(batch, steps, names, lr).double().cpu())
                continue
            try:
                vals = ad.run(batch, steps, use_vmap)
            except Exception:
                if vectorize != "auto" or not use_vmap:
                    raise
                use_vmap = False  # an op without a batching rule: per-task loop from now on
                vals = ad.run(batch, steps, use_vmap)
            per_task[label].append(vals.double().cpu())
        done += b
        if progress is not None:
            progress(done, n_tasks)
    used = vectorize if vectorize == "adapt" else ("vmap" if use_vmap else "loop")
    return {label: torch.cat(v, dim=1) for label, v in per_task.items()}, used


def validated_selection(meta_model, family=None, n_tasks: int = 200, steps: Optional[int] = None,
                        split: str = "val", seed: int = 0, batch_size: int = 25) -> dict:
    """Task-specific modules chosen on meta-validation tasks instead of by a sigma^2 threshold (issue 20: the ln-100
    gap rule flips from every module to one between nearby gaps, and raw sigma^2 does not compare across module
    types).

    Modules are ranked by learned sigma^2 (largest first); each prefix of the ranking (the top 1, the top 2, ...,
    all) adapts on the same ``n_tasks`` tasks of ``split`` for ``steps`` steps (the deployment horizon; default
    ``inner.steps``), and the smallest prefix whose paired per-task difference to "all" is within one standard
    error of it (no worse than all by more than one SE) is chosen. Returns ``{"method": "validated", "selected",
    "ranking", "horizon", "n_tasks", "split", "metric", "evidence": [{"modules", "mean", "diff_vs_all", "se",
    "within"}]}``: the evidence a module map can store. Without learned sigma^2 every module is selected."""
    if not meta_model.learns_sigma:
        return {"method": "validated", "selected": list(meta_model.partition.names), "ranking": None,
                "horizon": None, "n_tasks": 0, "split": split, "metric": metric_name(meta_model.kind), "evidence": []}
    family = family if family is not None else meta_model.family
    horizon = int(meta_model.config["inner"]["steps"] if steps is None else steps)
    names = list(meta_model.partition.names)
    s2 = meta_model.sigma2()
    ranking = sorted(range(len(names)), key=lambda i: -float(s2[i]))
    prefixes = [[names[i] for i in ranking[:k]] for k in range(1, len(names) + 1)]
    choices = [("+".join(p), p) for p in prefixes]
    per_task, _ = _per_task(meta_model, family, n_tasks, [horizon], choices, split,
                            torch.Generator().manual_seed(int(seed)), batch_size, None, "auto", None)
    higher_better = meta_model.kind == "classification"
    ref = per_task[choices[-1][0]][0]
    evidence, chosen = [], None
    for label, mods in choices:
        v = per_task[label][0]
        ok = torch.isfinite(v) & torch.isfinite(ref)
        d = v[ok] - ref[ok]
        se = float(d.std(unbiased=True) / math.sqrt(d.numel())) if d.numel() > 1 else 0.0
        worse = -float(d.mean()) if higher_better else float(d.mean())
        within = bool(ok.all()) and worse <= se
        evidence.append({"modules": mods, "mean": float(v[ok].mean()), "diff_vs_all": float(d.mean()), "se": se,
                         "within": within})
        if within and chosen is None:
            chosen = mods
    return {"method": "validated", "selected": [n for n in names if n in chosen], "ranking": [names[i] for i in ranking],
            "horizon": horizon, "n_tasks": int(n_tasks), "split": split, "metric": metric_name(meta_model.kind),
            "evidence": evidence}
