"""A trained meta-model: task-specific module selection (Sec. 4.3), adaptation and prediction.

``MetaModel.adapt`` is the one adaptation routine used by meta-test evaluation and by the service's adapt
endpoint: only the selected modules move (the rest stay at phi), regularised by the learned prior, for up to
10,000 steps at constant memory (each step builds and frees its own small graph; nothing is kept).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Optional

import torch


from .algorithms import SIGMA_ALGORITHMS, Learner
from .baselines import BASELINES
from .models import apply, build_model
from .modules import build_partition, per_param, prior_penalty, sigma2
from .optim import build_optimizer
from .selection import MIN_GAP, select_modules, selection  # noqa: F401  (re-exported: core.adapt.selection)
from .tasks import build_family

MAX_ADAPT_STEPS = 10_000
# An adaptation diverges when its support loss is not finite or exceeds DIVERGE_FACTOR x its loss before the first
# step: a descent method does not legitimately grow its objective a thousandfold, while a finite blow-up does
# happen (issue 21: a Meta-SGD sinusoid model adapted past its 5 meta-training steps answered a query MSE of 1.4e25
# against 6.9 unadapted). The adaptation then stops and returns its best support-loss step.
DIVERGE_FACTOR = 1e3


class NonFiniteError(ValueError):
    """The support loss is not finite before any adaptation step: the inputs' magnitude makes the model overflow."""


@dataclass
class AdaptResult:
    params: dict          # full parameter dict (adapted modules + phi elsewhere)
    adapted_modules: list
    loss_curve: list      # support loss before the first step and after every step (steps + 1 values,
    #                       or diverged_at_step of them)
    diverged_at_step: Optional[int] = None  # the first step whose loss was not finite; params are the last finite

    def adapter(self, partition) -> dict:
        """Only the adapted tensors: what an adapter stores."""
        names = partition.param_names(self.adapted_modules)
        return {k: self.params[k] for k in names}


class _FlatPlan:
    """The adapted tensors of one module choice as one flat vector: their sizes and shapes, phi's values of them
    as a flat ``center``, the frozen rest, and (per support-set size) the flat prior precision. Built once per
    module choice and kept by the meta-model, so a request pays for none of it; rebuilt when phi is replaced or
    one of its adapted tensors changed in place (``fresh``), the precisions when log sigma^2 did."""

    def __init__(self, phi: dict, names):
        self.phi = phi
        self.names = list(names)
        self.versions = [phi[k]._version for k in self.names]
        self.sizes = [phi[k].numel() for k in self.names]
        self.shapes = [tuple(phi[k].shape) for k in self.names]
        ref = next(iter(phi.values()))
        self.center = (torch.cat([phi[k].reshape(-1) for k in self.names]) if self.names
                       else torch.zeros(0, dtype=ref.dtype, device=ref.device))
        chosen = set(self.names)
        self.frozen = {k: v for k, v in phi.items() if k not in chosen}
        self._lam: dict = {}
        self._lam_of = None

    def fresh(self, phi: dict) -> bool:
        return phi is self.phi and all(phi[k]._version == v for k, v in zip(self.names, self.versions))

    def unflat(self, flat: torch.Tensor, copy: bool = False) -> dict:
        """name -> view of ``flat`` (``copy``: tensors of their own, e.g. to save with safetensors)."""
        parts = flat.split(self.sizes)
        if copy:
            return {k: t.view(s).clone() for k, t, s in zip(self.names, parts, self.shapes)}
        return {k: t.view(s) for k, t, s in zip(self.names, parts, self.shapes)}

    def lam(self, mm: "MetaModel", n_examples: int) -> torch.Tensor:
        """``mm.lam`` for ``n_examples`` support examples as one flat vector (each tensor's lambda repeated)."""
        ls = mm.log_sigma2
        if self._lam_of is None or self._lam_of[0] is not ls or self._lam_of[1] != ls._version:
            self._lam, self._lam_of = {}, (ls, ls._version)
        out = self._lam.get(n_examples)
        if out is None:
            lam = mm.lam(self.names, n_examples)
            out = torch.cat([lam[k].reshape(()).expand(n) for k, n in zip(self.names, self.sizes)])
            self._lam[n_examples] = out
            while len(self._lam) > 16:
                self._lam.pop(next(iter(self._lam)))
        return out


def _diverged(v: float, curve: list) -> bool:
    """The support loss ``v`` is not finite, or above DIVERGE_FACTOR x the first loss of ``curve``."""
    return not math.isfinite(v) or (bool(curve) and v > DIVERGE_FACTOR * float(curve[0]))


def _last_loss(curve: list, diverged, steps: int, loss_fn):
    """The end of an adaptation loop: the support loss after the last step joins ``curve`` unless it diverged
    (``_diverged``: then the adaptation diverged at ``steps``). Returns the step of divergence or None; a loss
    that was not finite before any step is a NonFiniteError (the inputs make the model overflow)."""
    if diverged is None:
        with torch.no_grad():
            loss = loss_fn()
        if _diverged(loss.item(), curve):
            diverged = steps
        else:
            curve.append(loss)
    if diverged == 0:
        raise NonFiniteError("the support loss is not finite before adaptation: the inputs' magnitude makes the "
                             "model overflow")
    return diverged


class MetaModel:
    """``extra``: the algorithm's own meta-learned tensors (Meta-SGD's learning rates, T-net's T, ...). For
    those algorithms (``custom_adapt``) ``adapt`` and ``predict`` run the algorithm's own inner rule and
    forward (``core.baselines``) instead of the inner optimizer of the job config."""

    def __init__(self, config: dict, phi: dict, log_sigma2: torch.Tensor, device=None, extra: dict | None = None):
        self.config = config
        self.algorithm = config["algorithm"]["name"]
        self.device = torch.device(device) if device is not None else next(iter(phi.values())).device
        self.family = build_family(config["tasks"], int(config.get("seed", 0)))
        # execution.amp: meta-test runs the forward the meta-model was trained with (bf16 convolutions)
        amp = bool(config.get("execution", {}).get("amp", False))
        self.model = build_model(config["model"], self.family, amp=amp).to(self.device)
        # the model's own parameter order (a safetensors file hands keys back sorted): the partition's module
        # order, and so the meaning of log_sigma2[m], follows it
        order = [k for k, _ in self.model.named_parameters()]
        missing = set(order) ^ set(phi)
        if missing:
            raise ValueError(f"parameters do not match the model: {sorted(missing)}")
        self.phi = {k: phi[k].to(self.device) for k in order}
        self.log_sigma2 = log_sigma2.to(self.device)
        self.dtype = next(iter(self.phi.values())).dtype
        mods = config["modules"]
        self.partition = build_partition(self.phi, mods["partition"], mods.get("groups"))
        self.learns_sigma = self.algorithm in SIGMA_ALGORITHMS
        self.uses_prior = self.learns_sigma or self.algorithm == "imaml"
        self.extra = {k: v.to(self.device) for k, v in (extra or {}).items()}
        self.rule = None  # the algorithm, where it brings its own adaptation rule
        self._plans: dict = {}  # module choice -> _FlatPlan (adapt's flat vector layout)
        self._selected = None  # (log_sigma2, its version, config["modules"], selected module names)
        if self.algorithm in BASELINES:
            inner = config["inner"]
            learner = Learner(self.model, self.family, self.partition,
                              build_optimizer(inner["optimizer"], inner["lr"], inner["betas"], inner["eps"]),
                              inner["steps"], lr=inner["lr"])
            self.rule = BASELINES[self.algorithm](learner, config["algorithm"])
            want = set(self.rule.init_extra(self.phi))
            if set(self.extra) != want:
                raise ValueError(f"extra tensors do not match the algorithm: {sorted(set(self.extra) ^ want)}")

    # ------------------------------------------------------------------ shape contract
    @property
    def kind(self) -> str:
        return self.family.kind

    @property
    def input_shape(self) -> tuple:
        return tuple(self.family.input_shape)

    @property
    def output_dim(self) -> int:
        return int(self.family.output_dim)

    # ------------------------------------------------------------------ modules
    def sigma2(self):
        return sigma2(self.log_sigma2) if self.uses_prior else None

    def selection(self) -> dict:
        """Which modules are task-specific and why (``core.adapt.selection``); without learned sigma^2 every
        module is (method ``none``)."""
        if not self.learns_sigma:
            return {"method": "none", "selected": list(self.partition.names), "gap": None, "min_gap": None,
                    "separated": False}
        m = self.config["modules"]
        return selection(self.partition.names, self.log_sigma2, m["selection"], m["threshold"], m["k"],
                         m.get("min_gap", MIN_GAP))

    def selected_modules(self) -> list:
        """``selection()["selected"]``, computed once per value of log sigma^2 (every adapt request asks)."""
        ls, mods = self.log_sigma2, self.config["modules"]
        c = self._selected
        if c is None or c[0] is not ls or c[1] != ls._version or c[2] != mods:
            c = self._selected = (ls, ls._version, copy.deepcopy(mods), self.selection()["selected"])
        return list(c[3])

    def module_map(self) -> list:
        """One entry per module: name, size, sigma^2 and whether it is selected; every entry also carries the
        selection's ``gap`` (largest gap in log sigma^2) and ``separated`` flag, so a stored map says why."""
        sel = self.selection()
        selected = set(sel["selected"])
        s2 = self.sigma2()
        return [{"name": n, "n_params": int(self.partition.sizes[i]),
                 "sigma2": float(s2[i]) if s2 is not None else None, "selected": n in selected,
                 "gap": sel["gap"], "separated": sel["separated"]}
                for i, n in enumerate(self.partition.names)]

    def lam(self, names, n_examples: int):
        """Per-parameter prior precision lambda_m = w / sigma_m^2 for adapting ``names`` on ``n_examples``
        support examples (w: ``Family.prior_weight``, Eq. 4's balance); None without a prior."""
        if not (self.uses_prior and names):
            return None
        return per_param(self.partition, self.family.prior_weight(n_examples) / sigma2(self.log_sigma2), names)

    def resolve_modules(self, modules="selected") -> list:
        if modules == "selected":
            return self.selected_modules()
        if modules == "all":
            return list(self.partition.names)
        if isinstance(modules, str):
            modules = [modules]
        unknown = [m for m in modules if m not in self.partition.names]
        if unknown:
            raise ValueError(f"unknown modules {unknown}; the model's modules are {list(self.partition.names)}")
        return list(dict.fromkeys(modules))

    # ------------------------------------------------------------------ adapt / predict
    def _tensor(self, x, target=False):
        t = torch.as_tensor(x, device=self.device)
        if target and self.kind == "classification":
            return t.long()
        return t.to(self.dtype)

    def loss(self, params, x, y):
        return self.family.loss(self.forward(params, x), y)

    def adapt(self, xs, ys, steps: int | None = None, modules="selected", lr: float | None = None,
              on_step=None, interrupt=None) -> AdaptResult:
        """Adapt the chosen modules to the support set (xs, ys) for ``steps`` inner steps (the job's inner
        optimizer and learning rate unless ``lr`` is given). ``on_step(step, params)`` is called with the full
        parameter dict before the first step (step 0) and after every step, e.g. to score a query set along
        the way (evaluation schedules) without re-running the adaptation. ``interrupt(step)`` is called before
        every step with nothing else (cheap: no parameter dict is built for it); whatever it raises stops the
        adaptation (the service's deadline).

        The adapted tensors move as one flat vector (``_FlatPlan``): the inner optimizer updates it with a few
        vector operations instead of a few per tensor, the same elementwise arithmetic, so the result is that of
        the optimizer applied tensor by tensor, to the bit."""
        inner = self.config["inner"]
        steps = inner["steps"] if steps is None else int(steps)
        if not 0 <= steps <= MAX_ADAPT_STEPS:
            raise ValueError(f"steps must be in [0, {MAX_ADAPT_STEPS}], got {steps}")
        xs, ys = self._tensor(xs), self._tensor(ys, target=True)
        chosen = self.resolve_modules(modules)
        names = self.partition.param_names(chosen)
        if self.rule is not None:
            return self._adapt_rule(xs, ys, steps, chosen, names, lr, on_step, interrupt)
        opt = build_optimizer(inner["optimizer"], lr or inner["lr"], inner["betas"], inner["eps"])
        plan = self._plan(names)
        n = xs.shape[0]
        lam = self.lam(names, n)
        lam_flat = plan.lam(self, n) if lam else None
        center = {k: self.phi[k] for k in names}
        state = [opt.init({"": plan.center}) if names else {}]
        fcenter = {"": plan.center}
        fam, model = self.family, self.model

        def objective(params, leaves):
            loss = fam.loss(apply(model, params, xs), ys)
            return loss, (loss + prior_penalty(leaves, center, lam) if (lam and not opt.proximal) else loss)

        def update(flat, grad):
            new, state[0] = opt.update({"": grad}, state[0], {"": flat}, fcenter, {"": lam_flat} if lam else None)
            return new[""]

        return self._flat_steps(plan, plan.center, steps, chosen, objective, update, on_step, interrupt)

    def _plan(self, names) -> "_FlatPlan":
        key = tuple(names)
        plan = self._plans.get(key)
        if plan is None or not plan.fresh(self.phi):
            self._plans.pop(key, None)
            plan = self._plans[key] = _FlatPlan(self.phi, names)
            while len(self._plans) > 32:
                self._plans.pop(next(iter(self._plans)))
        return plan

    def _flat_steps(self, plan, flat, steps, chosen, objective, update, on_step, interrupt) -> AdaptResult:
        """``_steps`` on the flat vector of the adapted tensors: ``objective(params, leaves)``,
        ``update(flat, flat_grad) -> flat``. The leaves the forward sees are built once: views of one buffer that
        each step's new values are copied into (no per-step split, views or graph nodes for them)."""
        frozen, unflat = plan.frozen, plan.unflat
        curve, best, best_loss, diverged = [], flat, math.inf, None
        buf = flat.clone()
        leaves = {k: v.detach().requires_grad_(True) for k, v in unflat(buf).items()}  # share buf's storage
        inputs, params = list(leaves.values()), {**frozen, **leaves}
        if on_step is not None:
            on_step(0, {**frozen, **unflat(flat)})
        for step in range(1, steps + 1):
            if interrupt is not None:
                interrupt(step - 1)
            loss, obj = objective(params, leaves)
            v = loss.item()  # one device sync a step, as before
            if _diverged(v, curve):
                diverged = step - 1
                break
            if v < best_loss:
                best, best_loss = flat, v
            grads = torch.autograd.grad(obj, inputs) if inputs else ()
            curve.append(loss.detach())
            if inputs:
                with torch.no_grad():
                    flat = update(flat, torch.cat([g.reshape(-1) for g in grads]))
                    buf.copy_(flat)
            if on_step is not None:
                on_step(step, {**frozen, **unflat(flat)})
        diverged = _last_loss(curve, diverged, steps, lambda: objective({**frozen, **unflat(flat)}, unflat(flat))[0])
        if diverged is not None:  # the best support-loss step before the divergence
            flat = best
        params = {**frozen, **plan.unflat(flat, copy=True)}
        return AdaptResult(params, chosen, [float(v) for v in torch.stack(curve).cpu()], diverged)

    def _steps(self, frozen, theta, steps, chosen, objective, update, on_step, interrupt=None) -> AdaptResult:
        """The adaptation loop: ``objective(params, leaves) -> (data loss, objective)``, ``update(theta, grads)``.
        Stops at the first step whose support loss diverges (not finite, or above DIVERGE_FACTOR x its start) and
        returns the parameters of the lowest support loss before it (``diverged_at_step``); a loss that is not
        finite before any step is a ValueError (the inputs make the model overflow)."""
        curve, best, best_loss, diverged = [], theta, math.inf, None
        if on_step is not None:
            on_step(0, {**frozen, **theta})
        for step in range(1, steps + 1):
            if interrupt is not None:
                interrupt(step - 1)
            leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
            loss, obj = objective({**frozen, **leaves}, leaves)
            v = loss.item()
            if _diverged(v, curve):
                diverged = step - 1
                break
            if v < best_loss:
                best, best_loss = theta, v
            grads = torch.autograd.grad(obj, list(leaves.values())) if leaves else ()
            curve.append(loss.detach())
            with torch.no_grad():
                theta = update(theta, dict(zip(leaves, grads)))
            if on_step is not None:
                on_step(step, {**frozen, **theta})
        diverged = _last_loss(curve, diverged, steps, lambda: objective({**frozen, **theta}, theta)[0])
        if diverged is not None:
            theta = best
        return AdaptResult({**frozen, **theta}, chosen, [float(v) for v in torch.stack(curve).cpu()], diverged)

    def _adapt_rule(self, xs, ys, steps, chosen, names, lr, on_step, interrupt=None):
        """The algorithm's own inner rule (``core.baselines.Unrolled``) with its meta-learned tensors, at
        meta-test (MT-net: hard masks). ``lr`` scales the algorithm's step sizes by lr / inner.lr."""
        rule, extra = self.rule, self.extra
        scale = 1.0 if lr is None else float(lr) / float(self.config["inner"]["lr"])
        names = rule.adapted(names)
        chosen = [m for m in chosen if any(p in names for p in self.partition.param_names([m]))]
        frozen = {k: v for k, v in self.phi.items() if k not in names}
        theta = rule.init_theta(self.phi, extra, names)
        ctx = rule.context(extra, None)

        def objective(params, _leaves):
            loss = rule.loss(params, extra, xs, ys)
            return loss, loss

        return self._steps(frozen, theta, steps, chosen, objective,
                           lambda th, g: rule.step(th, g, extra, ctx, scale), on_step, interrupt)

    def forward(self, params, x):
        """The model's output for a full parameter dict (with the algorithm's extra tensors where it has them)."""
        return self.rule.forward(params, self.extra, x) if self.rule is not None else apply(self.model, params, x)

    @torch.no_grad()
    def predict(self, x, params: dict | None = None):
        out = self.forward(params if params is not None else self.phi, self._tensor(x))
        return out.softmax(-1) if self.kind == "classification" else out

    @property
    def vmaps_forward(self) -> bool:
        """Whether ``predict_many`` may vmap the forward over adapters: the models' own forwards, not an
        algorithm's (its masks and transforms are not written for it) nor amp's autocast."""
        return self.rule is None and not getattr(self.model, "amp", False)

    @torch.no_grad()
    def predict_many(self, xs: list, adapted: list, max_rows: int = 65_536) -> list:
        """``[predict(xs[i], {**phi, **adapted[i]})]`` for many adapters of this model (``adapted[i]``: adapter i's
        tensors), with as few forwards as the query shapes allow: adapters whose queries have the same number of
        rows run as one forward under ``torch.func.vmap`` over the adapters (their tensors stacked; parameters no
        adapter replaces stay phi, unbatched). A model that treats rows independently (``row_independent``) pads
        queries with zero rows up to the next power of two, so that queries of mixed sizes share forwards at
        most twice the rows. Up to ``max_rows`` padded rows per forward; a model whose forward does not vmap
        (``vmaps_forward``) predicts one by one."""
        xs = [self._tensor(x) for x in xs]
        out: list = [None] * len(xs)
        if not self.vmaps_forward:
            for i, x in enumerate(xs):
                out[i] = self.predict(x, {**self.phi, **adapted[i]})
            return out
        pad = bool(getattr(self.model, "row_independent", False))
        buckets: dict = {}
        for i, x in enumerate(xs):
            n = x.shape[0]
            buckets.setdefault((1 << (n - 1).bit_length()) if pad else n, []).append(i)
        for n, idx in buckets.items():
            per = max(1, max_rows // max(n, 1))
            for c in range(0, len(idx), per):
                chunk = idx[c:c + per]
                if len(chunk) == 1:
                    i = chunk[0]
                    out[i] = self.predict(xs[i], {**self.phi, **adapted[i]})
                    continue
                for i, y in zip(chunk, self._predict_vmapped([xs[i] for i in chunk], [adapted[i] for i in chunk], n)):
                    out[i] = y
        return out

    def _predict_vmapped(self, xs: list, adapted: list, rows: int) -> list:
        moved = set().union(*adapted)
        params = {k: torch.stack([a.get(k, v) for a in adapted]) if k in moved else v for k, v in self.phi.items()}
        dims = {k: 0 if k in moved else None for k in self.phi}
        if all(x.shape[0] == rows for x in xs):
            x = torch.stack(xs)
        else:
            x = xs[0].new_zeros((len(xs), rows, *xs[0].shape[1:]))
            for j, xi in enumerate(xs):
                x[j, :xi.shape[0]] = xi
        y = torch.func.vmap(self.forward, in_dims=(dims, 0))(params, x)
        if self.kind == "classification":
            y = y.softmax(-1)
        return [y[j, :xi.shape[0]] for j, xi in enumerate(xs)]

    # ------------------------------------------------------------------ serialisation
    def tensors(self) -> dict:
        t = {f"phi.{k}": v.detach().cpu().contiguous() for k, v in self.phi.items()}
        t["log_sigma2"] = self.log_sigma2.detach().cpu().contiguous()
        t.update({f"extra.{k}": v.detach().cpu().contiguous() for k, v in self.extra.items()})
        return t

    @classmethod
    def from_tensors(cls, config: dict, tensors: dict, device=None):
        phi = {k[4:]: v for k, v in tensors.items() if k.startswith("phi.")}
        extra = {k[6:]: v for k, v in tensors.items() if k.startswith("extra.")}
        return cls(config, phi, tensors["log_sigma2"], device=device, extra=extra or None)
