"""The contenders of the peer harness: ours (``MetaTrainer.step()``, eager and compiled) and the peers (a plain
torch unroll, torchopt as a loop, channels-last and vmapped, higher), each taking the same batch and doing one
second-order meta-step with an Adam outer step."""
from __future__ import annotations

import importlib
import time

import torch

from core.trainer import MetaTrainer

from .workloads import (LOG_S2_MAX, LOG_S2_MIN, OUTER_LR, ig_penalty, job_config, loss_fn, module_index, peer_model,
                        prior_lams, prior_term)


class Ours:
    """``MetaTrainer.step()`` on a given batch (``sample`` replaced), or unmodified (end-to-end)."""
    name = "ours"

    def __init__(self, workload, alg, dtype="float32", meta_batch=None, steps=None, vectorize=None):
        self.trainer = MetaTrainer(job_config(workload, alg, dtype, meta_batch, steps, vectorize))

    def phi0(self):
        return {k: v.detach().clone() for k, v in self.trainer.meta["phi"].items()}

    def log_sigma2_0(self):
        return self.trainer.meta["log_sigma2"].detach().clone()

    def meta_grad(self, batch):
        delta, _ = self.trainer.reduce(*self.trainer.task_updates(batch))
        return dict(delta["phi"]), delta["log_sigma2"]

    def step(self, batch):
        self.trainer.sample = lambda split="train": batch
        try:
            return self.trainer.step()["query_loss"]
        finally:
            del self.trainer.sample  # back to MetaTrainer.sample

    def step_e2e(self):
        return self.trainer.step()["query_loss"]

    def params(self):
        return dict(self.trainer.meta["phi"]), self.trainer.meta["log_sigma2"]


class OursCompiled(Ours):
    """The same with ``execution.compile: true`` (what "auto", the default, picks for a long conv4 or sinusoid job):
    the vmapped meta-step (sinusoid) or one task's update (conv4 loop) compiled. Its first step compiles (a cold
    cache: torch's caches are pointed at a fresh directory); that time is reported apart, not in the step times."""
    name = "ours-compiled"

    def __init__(self, workload, alg):
        torch._dynamo.reset()  # one compiled variant per trainer; stay clear of Dynamo's recompile limit
        self.trainer = MetaTrainer(job_config(workload, alg, compile=True))
        self.sigma = alg == "sigma_maml"
        self.compile_s = None

    def step(self, batch):
        t0 = time.perf_counter()
        out = super().step(batch)
        if self.compile_s is None:
            self.compile_s = time.perf_counter() - t0
        return out


class _Peer:
    """Common to the peers: the nn.Module, log sigma^2 as a leaf tensor, torch.optim.Adam as the outer step."""

    def __init__(self, workload, alg, phi, log_sigma2, dtype, inner_lr, inner_steps):
        self.sigma = alg == "sigma_maml"
        self.net = peer_model(workload, phi, dtype)
        self.names = [n for n, _ in self.net.named_parameters()]
        self.index = module_index(self.names)
        self.log_sigma2 = log_sigma2.detach().clone().to(dtype).requires_grad_(self.sigma)
        self.loss = loss_fn(workload)
        self.lr, self.steps = inner_lr, inner_steps
        groups = [{"params": list(self.net.parameters()), "lr": OUTER_LR}]
        if self.sigma:
            groups.append({"params": [self.log_sigma2], "lr": OUTER_LR})
        self.opt = torch.optim.Adam(groups)

    def accumulate(self, batch):
        """Leave d(mean query loss)/d(phi, log sigma^2) in .grad; returns the mean query loss (a float)."""
        raise NotImplementedError

    def _zero(self):
        self.opt.zero_grad(set_to_none=True)
        self.log_sigma2.grad = None

    def meta_grad(self, batch):
        self._zero()
        self.accumulate(batch)
        g = {n: p.grad.detach().clone() for n, p in self.net.named_parameters()}
        ls = self.log_sigma2.grad
        return g, (ls.detach().clone() if ls is not None else torch.zeros_like(self.log_sigma2))

    def step(self, batch):
        self._zero()
        loss = self.accumulate(batch)
        if self.sigma:
            ig_penalty(self.log_sigma2).backward()
        self.opt.step()
        if self.sigma:
            with torch.no_grad():
                self.log_sigma2.clamp_(LOG_S2_MIN, LOG_S2_MAX)
        return loss

    def params(self):
        return {n: p for n, p in self.net.named_parameters()}, self.log_sigma2


class TorchRef(_Peer):
    """Plain torch: the unrolled inner loop with torch.autograd.grad(create_graph=True), per-task backward."""
    name = "torch"

    def accumulate(self, batch):
        xs, ys, xq, yq = batch
        B = xs.shape[0]
        phi = list(self.net.parameters())
        total = 0.0
        for i in range(B):
            lams = prior_lams(self.log_sigma2, self.index, xs.shape[1]) if self.sigma else None
            theta = phi
            for _ in range(self.steps):
                out = torch.func.functional_call(self.net, dict(zip(self.names, theta)), (xs[i],))
                obj = self.loss(out, ys[i])
                if self.sigma:
                    obj = obj + prior_term(theta, phi, lams)
                grads = torch.autograd.grad(obj, theta, create_graph=True)
                theta = [t - self.lr * g for t, g in zip(theta, grads)]
            q = self.loss(torch.func.functional_call(self.net, dict(zip(self.names, theta)), (xq[i],)), yq[i])
            (q / B).backward()
            total += float(q.detach())
        return total / B


class TorchoptLoop(_Peer):
    """torchopt.MetaSGD on the module, task by task (torchopt's few-shot MAML example)."""
    name = "torchopt"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        import torchopt
        self.torchopt = torchopt
        self.inner = torchopt.MetaSGD(self.net, lr=self.lr)

    def accumulate(self, batch):
        to = self.torchopt
        xs, ys, xq, yq = batch
        B = xs.shape[0]
        net_state = to.extract_state_dict(self.net, by="reference", detach_buffers=True)
        opt_state = to.extract_state_dict(self.inner, by="reference")
        phi = list(self.net.parameters())
        total = 0.0
        for i in range(B):
            lams = prior_lams(self.log_sigma2, self.index, xs.shape[1]) if self.sigma else None
            for _ in range(self.steps):
                obj = self.loss(self.net(xs[i]), ys[i])
                if self.sigma:
                    obj = obj + prior_term(list(self.net.parameters()), phi, lams)
                self.inner.step(obj)
            q = self.loss(self.net(xq[i]), yq[i])
            (q / B).backward()
            total += float(q.detach())
            to.recover_state_dict(self.net, net_state)
            to.recover_state_dict(self.inner, opt_state)
        return total / B


class TorchoptLoopChannelsLast(TorchoptLoop):
    """torchopt (loop) with the model and its inputs in channels-last memory, as ours runs conv4 by default."""
    name = "torchopt-cl"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.net.to(memory_format=torch.channels_last)
        self.net.channels_last = True


class TorchoptVmap(_Peer):
    """torchopt.sgd functional updates + torch.func.grad, vmapped over the tasks (torchopt's FuncTorch example)."""
    name = "torchopt-vmap"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        import torchopt
        self.torchopt = torchopt
        net, loss, steps, sigma, index, opt = self.net, self.loss, self.steps, self.sigma, self.index, \
            torchopt.sgd(lr=self.lr)
        names = self.names

        def task_loss(params, log_sigma2, xs, ys, xq, yq):
            lams = prior_lams(log_sigma2, index, xs.shape[0]) if sigma else None

            def inner_objective(theta):
                obj = loss(torch.func.functional_call(net, theta, (xs,)), ys)
                if sigma:
                    obj = obj + prior_term([theta[n] for n in names], [params[n] for n in names], lams)
                return obj

            state = opt.init(params)
            theta = params
            for _ in range(steps):
                g = torch.func.grad(inner_objective)(theta)
                updates, state = opt.update(g, state, inplace=False)
                theta = torchopt.apply_updates(theta, updates, inplace=False)
            return loss(torch.func.functional_call(net, theta, (xq,)), yq)

        self.batched = torch.func.vmap(task_loss, in_dims=(None, None, 0, 0, 0, 0))

    def accumulate(self, batch):
        params = dict(self.net.named_parameters())
        losses = self.batched(params, self.log_sigma2, *batch)
        m = losses.mean()
        m.backward()
        return float(m.detach())


class Higher(_Peer):
    """higher.innerloop_ctx with torch.optim.SGD, task by task (higher's MAML example)."""
    name = "higher"

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        import higher
        self.higher = higher
        self.inner = torch.optim.SGD(self.net.parameters(), lr=self.lr)

    def accumulate(self, batch):
        xs, ys, xq, yq = batch
        B = xs.shape[0]
        phi = list(self.net.parameters())
        total = 0.0
        for i in range(B):
            lams = prior_lams(self.log_sigma2, self.index, xs.shape[1]) if self.sigma else None
            with self.higher.innerloop_ctx(self.net, self.inner, copy_initial_weights=False) as (fnet, diffopt):
                for _ in range(self.steps):
                    obj = self.loss(fnet(xs[i]), ys[i])
                    if self.sigma:
                        obj = obj + prior_term(list(fnet.parameters()), phi, lams)
                    diffopt.step(obj)
                q = self.loss(fnet(xq[i]), yq[i])
                (q / B).backward()
            total += float(q.detach())
        return total / B


PEERS = {"torch": TorchRef, "torchopt": TorchoptLoop, "torchopt-cl": TorchoptLoopChannelsLast,
         "torchopt-vmap": TorchoptVmap, "higher": Higher}
PEER_MODULE = {"torch": None, "torchopt": "torchopt", "torchopt-cl": "torchopt", "torchopt-vmap": "torchopt",
               "higher": "higher"}


def available(name: str) -> bool:
    mod = PEER_MODULE[name]
    if mod is None:
        return True
    try:
        importlib.import_module(mod)
        return True
    except Exception:
        return False


def build_peer(name, workload, alg, ours: Ours, dtype):
    """A peer on ``ours``' workload: its initial phi and log sigma^2, inner learning rate and steps."""
    if list(ours.trainer.partition.names) != list(dict.fromkeys(n.rsplit(".", 1)[0] for n in ours.phi0())):
        raise AssertionError("ours' partition is not per layer")
    L = ours.trainer.learner
    return PEERS[name](workload, alg, ours.phi0(), ours.log_sigma2_0(), dtype, L.lr, L.inner_steps)
