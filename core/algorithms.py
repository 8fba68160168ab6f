"""Meta-algorithms: one per-task update with a small strategy each, and the shared adaptation loop.

The meta-step skeleton (sample tasks, adapt each, compute each task's meta-update Delta_t, average,
apply the outer optimizer) lives in ``core.trainer``; here each algorithm only defines
``task_update(meta, xs, ys, xq, yq) -> (delta, metrics)`` where ``delta`` has the structure of
``meta = {"phi": {...}, "log_sigma2": Tensor[M]}`` and is what the outer optimizer descends.

- backprop (``maml``, ``fomaml``, ``sigma_maml``): Delta = grad of the query loss through the unrolled
  adaptation (Eq. 6), first-order optionally.
- implicit (``imaml``, ``sigma_imaml``): Delta = -g_val H^-1 H_{theta Phi} (Eq. 7) with H the damped Hessian
  of Eq. 48 solved by preconditioned CG on Hessian-vector products (forward-over-reverse ``torch.func.jvp``
  of ``torch.func.grad``); the mixed derivatives are closed-form:
  d^2 l_train / d theta_m d phi_m = -lambda_m I and d^2 l_train / d theta_m d log sigma_m^2 = -lambda_m (theta_m - phi_m).
- parameter difference (``reptile``, ``sigma_reptile``): Delta_phi = phi - theta (theta adapted on support and query
  together, the task's whole dataset), or lambda_m (phi_m - theta_m) for sigma-Reptile (Eq. 10, MAP of phi, by default on
  the same data; ``phi_data``), whose sigma^2 gets the implicit gradient of the query loss at theta adapted on the
  support set.

The prior's precision is lambda_m = w / sigma_m^2 with w = ``Family.prior_weight(n)``: 1 / n for the losses that
average over a task's n examples (sinusoid, polynomial, images), 1 for summed ones, so that every family keeps
Eq. 4's balance between the summed negative log-likelihood and the prior.
"""
from __future__ import annotations

import torch
from torch.func import grad, grad_and_value, jvp, vjp

from .cg import conjugate_gradient
from .modules import per_param, prior_penalty
from .registry import ALGORITHMS, Algorithm, Learner, build_algorithm, register  # noqa: F401  (re-exported)

SIGMA_ALGORITHMS = ("sigma_maml", "sigma_imaml", "sigma_reptile")


@register("maml", "fomaml", "sigma_maml")
class Backprop(Algorithm):
    """MAML / FOMAML / sigma-MAML: backpropagate through the unrolled adaptation (Eq. 6)."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.name = cfg["name"]
        self.learns_sigma = self.uses_prior = self.name == "sigma_maml"
        self.first_order = self.name == "fomaml" or bool(cfg.get("first_order", False))
        self.second_order = cfg.get("second_order", "unroll")
        if self.second_order == "hvp":
            if self.first_order:
                raise ValueError("second_order 'hvp' is the exact second-order meta-gradient; first_order must be off")
            if learner.inner.name not in ("sgd", "proximal_gd"):
                raise ValueError(f"second_order 'hvp' needs a stateless inner optimizer (sgd, proximal_gd), "
                                 f"not {learner.inner.name!r}")

    def _inner_step(self, theta, m, xs, ys):
        """One inner step theta_{k+1} = U(theta_k, Phi) of a stateless inner optimizer, as a function of both."""
        L, inner = self.learner, self.learner.inner
        phi = m["phi"]
        lam = L.lam(m["log_sigma2"], xs) if self.uses_prior else None

        def objective(th):
            loss = L.data_loss(th, xs, ys)
            if lam is not None and not inner.proximal:
                loss = loss + prior_penalty(th, phi, lam)
            return loss

        new, _ = inner.update(grad(objective)(theta), {}, theta, phi, lam)
        return new

    def _hvp_task_update(self, meta, xs, ys, xq, yq):
        """The same meta-gradient as the autograd unroll, computed backwards along the stored trajectory
        theta_0 .. theta_K (004: reverse-mode accumulation with Hessian-vector products). With
        v_K = dl_val/dtheta_K, v_k = (dU/dtheta_k)^T v_{k+1} and dPhi += (dU/dPhi)^T v_{k+1}; each vector-Jacobian
        product of U = theta - a grad(l_train) is the gradient of (grad l_train) . v, i.e. a Hessian-vector
        product, computed on a one-step graph that is freed before the next: memory O(|theta| K) for the
        trajectory instead of the K-step autograd graph with all its activations."""
        m = {"phi": meta["phi"], "log_sigma2": meta["log_sigma2"]}
        traj = [{k: v.detach() for k, v in m["phi"].items()}]
        for _ in range(self.learner.inner_steps - 1):
            traj.append({k: v.detach() for k, v in self._inner_step(traj[-1], m, xs, ys).items()})
        theta_K = self._inner_step(traj[-1], m, xs, ys) if self.learner.inner_steps else traj[-1]
        v, loss = grad_and_value(lambda th: self.learner.data_loss(th, xq, yq))(
            {k: t.detach() for k, t in theta_K.items()})
        acc = {"phi": {k: torch.zeros_like(t) for k, t in m["phi"].items()},
               "log_sigma2": torch.zeros_like(m["log_sigma2"])}
        for k in reversed(range(self.learner.inner_steps)):
            _, vjp_fn = vjp(lambda th, mm: self._inner_step(th, mm, xs, ys), traj[k], m)
            v, dm = vjp_fn(v)
            acc = {"phi": {n: acc["phi"][n] + dm["phi"][n] for n in acc["phi"]},
                   "log_sigma2": acc["log_sigma2"] + dm["log_sigma2"]}
        acc["phi"] = {n: acc["phi"][n] + v[n] for n in acc["phi"]}  # theta_0 = phi
        return acc, loss

    def task_update(self, meta, xs, ys, xq, yq):
        L = self.learner
        if self.second_order == "hvp":
            delta, loss = self._hvp_task_update(meta, xs, ys, xq, yq)
            if not self.learns_sigma:
                delta["log_sigma2"] = torch.zeros_like(meta["log_sigma2"])
            return delta, {"query_loss": loss}

        def query_loss(m):
            lam = L.lam(m["log_sigma2"], xs) if self.uses_prior else None
            theta = L.adapt(m["phi"], lam, xs, ys, first_order=self.first_order)
            return L.data_loss(theta, xq, yq)

        delta, loss = grad_and_value(query_loss)(meta)
        if not self.learns_sigma:
            delta["log_sigma2"] = torch.zeros_like(meta["log_sigma2"])
        return delta, {"query_loss": loss}

    def eager_task_update(self, meta, xs, ys, xq, yq):
        """``task_update`` with plain autograd (``torch.autograd.grad(create_graph=True)`` for the inner
        gradients, one backward for the meta-gradient): the same unrolled graph and the same numbers (tested to
        1e-12 in float64), without torch.func's per-op wrapping (the torch.func form took 1.22x the autograd loop
        peers' time on conv4 in benchmarks/peers.py at fa28324). The hvp mode keeps its own form."""
        if self.second_order == "hvp":
            return self.task_update(meta, xs, ys, xq, yq)
        L = self.learner
        phi = {k: v.detach().requires_grad_() for k, v in meta["phi"].items()}
        log_sigma2 = meta["log_sigma2"].detach().requires_grad_(self.learns_sigma)
        with torch.enable_grad():
            lam = L.lam(log_sigma2, xs) if self.uses_prior else None
            theta = L.adapt(phi, lam, xs, ys, first_order=self.first_order, autograd=True)
            loss = L.data_loss(theta, xq, yq)
            leaves = list(phi.values()) + ([log_sigma2] if self.learns_sigma else [])
            grads = torch.autograd.grad(loss, leaves, materialize_grads=True)
        delta = {"phi": dict(zip(phi, grads)),
                 "log_sigma2": grads[-1] if self.learns_sigma else torch.zeros_like(log_sigma2)}
        return delta, {"query_loss": loss.detach()}


class _ImplicitMixin:
    hvp = "forward"  # Hessian-vector products by jvp of grad; "reverse" (vjp of grad) under torch.compile

    @property
    def thread_safe(self):
        # forward-mode AD levels are process-wide, not per thread: jvp on two threads at once fails
        return self.hvp != "forward"

    def implicit(self, meta, theta, xs, ys, xq, yq, damping):
        """u = H^-1 g_val with H = Hess(l_data) + Sigma^-1 + damping I (Eq. 48), preconditioned by
        P = diag(max(lambda_m / 1e3, 1)) (App. D.2), lambda_m = w / sigma_m^2 (``Learner.lam_modules``). Returns u,
        lam and CG diagnostics."""
        L = self.learner
        lam_m = L.lam_modules(meta["log_sigma2"], xs)
        lam = per_param(L.partition, lam_m)
        precond_inv = per_param(L.partition, 1.0 / torch.clamp(lam_m / 1e3, min=1.0))
        g_val, q_loss = grad_and_value(lambda th: L.data_loss(th, xq, yq))(theta)
        g_train = grad(lambda th: L.data_loss(th, xs, ys))

        def matvec(v):
            if self.hvp == "forward":  # forward-over-reverse
                _, hv = jvp(g_train, (theta,), (v,))
            else:  # reverse-over-reverse: the gradient of g . v (MetaFGNet Eq. 5)
                hv = grad(lambda th: sum((g * v[k]).sum() for k, g in g_train(th).items()))(theta)
            return {k: hv[k] + (lam[k] + damping) * v[k] for k in v}

        u, residual, iters = conjugate_gradient(matvec, g_val, precond_inv, self.cfg["cg_steps"])
        metrics = {"query_loss": q_loss, "cg_residual": residual, "cg_iterations": iters,
                   "stationarity": self.stationarity(meta["phi"], theta, lam, g_train)}
        return u, lam, lam_m, metrics

    @staticmethod
    def stationarity(phi, theta, lam, g_train):
        """||grad(l_train + prior)(theta_K)|| / ||grad(l_train + prior)(phi)||: how far the inner loop's theta_K is
        from the MAP that the implicit gradient (Eq. 7, 10) is the derivative at. Near 0: the implicit gradient is
        valid; near 1 or above: theta_K is no closer to stationarity than phi was, and the meta-gradient is not
        the one the paper derives (the prior's gradient is 0 at phi, so the denominator is the data gradient)."""
        g_theta, g_phi = g_train(theta), g_train(phi)
        num = sum(((g_theta[k] + lam[k] * (theta[k] - phi[k])) ** 2).sum() for k in theta)
        den = sum((g_phi[k] ** 2).sum() for k in phi)
        return torch.sqrt(num / torch.clamp(den, min=torch.finfo(den.dtype).tiny))

    def damping(self, xs):
        """The damping term of Eq. 48 on this loss's scale. Eq. 48's d-tilde sits beside the Hessian of the summed
        negative log-likelihood and Sigma^-1; a loss averaged over n examples scales both by w = 1 / n
        (``Family.prior_weight``), so d-tilde is scaled by w too. iMAML's d multiplies I in (1 + d) I + H / lambda
        (Eq. 47): in Eq. 48's scale that is d * lambda, lambda = ``lam`` * w, so the two agree when
        sigma^2 = 1 / lam and d-tilde = d * lam (App. D.2)."""
        d = self.cfg["damping"] * self.learner.family.prior_weight(xs.shape[0])
        return d * self.cfg["lam"] if self.name == "imaml" else d

    def sigma_delta(self, meta, theta, u, lam_m):
        """d l_val / d log sigma_m^2 = u_m . (theta_m - phi_m) lambda_m (chain rule through lambda_m = w / sigma_m^2,
        d lambda_m / d log sigma_m^2 = -lambda_m)."""
        P = self.learner.partition
        per_module = [sum((u[k] * (theta[k] - meta["phi"][k])).sum() for k in P.members(m))
                      for m in range(len(P.names))]
        return torch.stack(per_module) * lam_m


@register("imaml", "sigma_imaml")
class Implicit(_ImplicitMixin, Algorithm):
    """sigma-iMAML (Eq. 7) and iMAML (fixed lambda, App. B.2 / D.1)."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.name = cfg["name"]
        self.learns_sigma = self.name == "sigma_imaml"
        self.uses_prior = True

    def task_update(self, meta, xs, ys, xq, yq):
        L = self.learner
        theta = L.adapt(meta["phi"], self._lam(meta, xs), xs, ys)
        u, lam, lam_m, metrics = self.implicit(meta, theta, xs, ys, xq, yq, self.damping(xs))
        delta = {"phi": {k: lam[k] * u[k] for k in u}}
        if self.learns_sigma:
            delta["log_sigma2"] = self.sigma_delta(meta, theta, u, lam_m)
        else:
            delta["log_sigma2"] = torch.zeros_like(meta["log_sigma2"])
        metrics["support_loss"] = L.data_loss(theta, xs, ys)
        return delta, metrics


@register("reptile", "sigma_reptile")
class ReptileFamily(_ImplicitMixin, Algorithm):
    """Reptile (Delta_phi = phi - theta) and sigma-Reptile (Eq. 10)."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.name = cfg["name"]
        self.learns_sigma = self.uses_prior = self.name == "sigma_reptile"

    def task_update(self, meta, xs, ys, xq, yq):
        L = self.learner
        phi = meta["phi"]
        if not self.learns_sigma:
            # Reptile adapts on the task's whole dataset D_t (Sec. 2: "Reptile instead optimizes theta_t on the
            # entire dataset"); the query loss it reports is then a training loss, not a held-out one
            x_all, y_all = torch.cat([xs, xq]), torch.cat([ys, yq])
            theta = L.adapt(phi, None, x_all, y_all)
            delta = {"phi": {k: phi[k] - theta[k] for k in phi}, "log_sigma2": torch.zeros_like(meta["log_sigma2"])}
            return delta, {"query_loss": L.data_loss(theta, xq, yq), "support_loss": L.data_loss(theta, xs, ys)}
        # phi: the MAP of Eq. 9 on ``phi_data``: "support" is the paper's D^train; "task" (the default) adds the
        # query set, the data Reptile adapts on. Deviation, measured in docs/results/omniglot_5way.md: with 1-shot
        # supports (5 images) D^train starves phi of data; the paper meta-trains the Reptile family on larger task
        # batches than it tests on (Table 8: 10 images vs 5). sigma^2: the implicit gradient of the query loss at
        # theta fitted on the support (Eq. 10), either way. "task" costs a second adaptation per task.
        theta = L.adapt(phi, self._lam(meta, xs), xs, ys)
        if self.cfg.get("phi_data", "task") == "task":
            x_all, y_all = torch.cat([xs, xq]), torch.cat([ys, yq])
            theta_all = L.adapt(phi, self._lam(meta, x_all), x_all, y_all)
        else:
            x_all, theta_all = xs, theta
        lam_all = per_param(L.partition, L.lam_modules(meta["log_sigma2"], x_all))
        u, lam, lam_m, metrics = self.implicit(meta, theta, xs, ys, xq, yq, self.damping(xs))
        delta = {"phi": {k: lam_all[k] * (phi[k] - theta_all[k]) for k in phi},
                 "log_sigma2": self.sigma_delta(meta, theta, u, lam_m)}
        metrics["support_loss"] = L.data_loss(theta, xs, ys)
        return delta, metrics
