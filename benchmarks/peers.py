"""Peer harness (issue 14 item 1): Metashrink's ``MetaTrainer.step()`` against torchopt and higher on the same work.

    make peers                                                   # builds .venv-peers, runs the full harness
    PYTHONPATH=. .venv-peers/bin/python benchmarks/peers.py            # full run (409 and 679 s measured on 2 shared cores)
    PYTHONPATH=. .venv-peers/bin/python benchmarks/peers.py --quick    # smoke run (32-51 s measured)
    PYTHONPATH=. .venv-peers/bin/python benchmarks/peers.py --no-write # print only, leave RESULTS.md alone

Workloads (identical for every contender: the same model shapes and initial parameters, the same task tensors,
the same inner learning rate and step counts, the same thread settings, second-order MAML with an Adam outer step):

- ``sinusoid``: mlp 1-40-40-1, 10 support / 10 query, 5 inner steps (lr 0.01), meta-batch 25.
- ``omniglot-1`` / ``omniglot-5``: conv4 (strided, 64 channels, batch-norm on batch statistics) 5-way 1-shot,
  15 queries per class, 28x28 real Omniglot (the zips in ../shared/data/omniglot or METASHRINK_OMNIGLOT_DIR),
  meta-batch 32, 1 and 5 inner steps (lr 0.4).

Algorithms: ``maml`` (second order) and ``sigma_maml`` where a peer can express it: the inner objective is the
support loss plus the Gaussian prior sum_m ||theta_m - phi_m||^2 / (2 sigma_m^2) with the prior precision
lambda_m = w / sigma_m^2 (w = 1 / n_support, ``Family.prior_weight``; sigma^2 = exp(clamp(log sigma^2)) clipped to
[1e-5, 1e5]), modules per layer, gradient descent on that objective (``inner.optimizer: sgd``), log sigma^2 learned
by the outer Adam (lr 1e-3) with the inverse-Gamma(1, 1e-5) penalty of ``core.modules.inverse_gamma_penalty`` and the
clamp after the update. sigma_maml's *default* inner optimizer is ``proximal_gd`` (the prior applied as a
proximal step, not as a loss term); the peers express the loss-term form, so that is what is compared here.

Contenders:

- ``ours``: ``core.trainer.MetaTrainer.step()`` itself (vmap for sinusoid, the per-task loop for conv4: the faster
  mode of each in benchmarks/core_bench.py), with its ``sample`` replaced by one returning the shared batch.
- ``torchopt`` (loop): ``torchopt.MetaSGD`` on the nn.Module, per-task inner loop, ``extract_state_dict`` /
  ``recover_state_dict`` between tasks (torchopt's few-shot MAML example), per-task backward.
- ``torchopt-cl`` (conv4 only): the same with the model and its inputs in channels-last memory (ours' default
  layout for conv4), so that the layout is not what separates ours from the peers.
- ``torchopt-vmap``: ``torchopt.sgd`` functional updates, ``torch.func.grad`` inner gradients, ``torch.func.vmap``
  over the tasks and ``functional_call`` (torchopt's FuncTorch MAML example).
- ``higher``: ``higher.innerloop_ctx`` (copy_initial_weights=False) with a ``torch.optim.SGD``, per-task loop and
  per-task backward (higher's MAML example).
- ``torch`` (reference, gradient check only): plain ``torch.autograd.grad(create_graph=True)`` unrolled by hand;
  needs no peer package, so tests/test_peers_harness.py checks ours against it in the main venv.

The outer step of every peer is ``torch.optim.Adam`` (lr 1e-3; log sigma^2 in its own parameter group).

Measurements, all in one process, contenders interleaved (the order rotates every repeat):

1. gradient match: on one fixed batch in float64, every contender's meta-gradient (phi and log sigma^2) against
   ours, and the parameters after one whole outer step (Adam, inverse-Gamma penalty, clamp) against ours' step:
   the max absolute difference. The timings compare the same computation only if these are ~1e-12.
2. compute step: per repeat one batch is sampled with Metashrink's sampler (the workload's ``Family.sample``) and
   handed to every contender; each contender's meta-step on it is timed (float32). Medians over repeats, and the
   per-repeat ratio ours / best peer (time; < 1 means ours is faster).
3. end-to-end step including task sampling: ours is the unmodified ``MetaTrainer.step()`` of a second trainer of the
   same config (it samples with its own generator), timed in every repeat among the others; a peer's is the sampling
   time of that repeat's shared batch plus its compute step (a peer would call the same sampler).

Repeats per workload are time-budgeted (``SCHEDULE``), so a full run stays near or under 15 minutes on 2 shared cores.
``--render RESULT.json`` rewrites the section from a saved JSON result without measuring.

Writes the "Peers" section of benchmarks/RESULTS.md (other sections are kept) and prints one JSON object.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.trainer import MetaTrainer  # noqa: E402
from schemas.job import JobConfig  # noqa: E402
from benchmarks.machine import commit as code_commit, cpu_name, write_section  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Peers"
PEER_NAMES = ("torchopt", "torchopt-cl", "torchopt-vmap", "higher")
CONV_ONLY = ("torchopt-cl",)  # peers that exist for the conv4 workloads only
ALGS = ("maml", "sigma_maml")
LOG_S2_MIN, LOG_S2_MAX = math.log(1e-5), math.log(1e5)  # the clip range of sigma^2 (App. D.2)
IG_BETA = 1e-5   # schemas default ig_beta
OUTER_LR = 1e-3  # schemas default lr_phi and lr_log_sigma2
MATCH_TOL = 1e-10  # float64 meta-gradient: max |peer - ours| <= MATCH_TOL * max(1, max |ours|) counts as the same

WORKLOADS = {
    "sinusoid": {"label": "sinusoid mlp 40-40, 5 steps, mb 25", "family": "sinusoid", "steps": 5, "meta_batch": 25,
                 "lr": 0.01, "vectorize": "vmap"},
    "omniglot-1": {"label": "Omniglot conv4 5-way 1-shot, 1 step, mb 32", "family": "omniglot", "steps": 1,
                   "meta_batch": 32, "lr": 0.4, "vectorize": "loop"},
    "omniglot-5": {"label": "Omniglot conv4 5-way 1-shot, 5 steps, mb 32", "family": "omniglot", "steps": 5,
                   "meta_batch": 32, "lr": 0.4, "vectorize": "loop"},
}


# --------------------------------------------------------------------------- configs and shared data
def job_config(workload: str, alg: str, dtype: str = "float32", meta_batch: int | None = None,
               steps: int | None = None, vectorize: str | None = None, compile: bool = False) -> dict:
    w = WORKLOADS[workload]
    if w["family"] == "sinusoid":
        model, tasks = {"arch": "mlp", "hidden": [40, 40]}, {"family": "sinusoid", "shots": 10, "query": 10}
    else:
        import datasets  # noqa: F401  (registers the "omniglot" source with core.tasks)
        model = {"arch": "conv4"}
        tasks = {"family": "image_classes", "source": "omniglot", "ways": 5, "shots": 1, "query": 15,
                 "image_size": 28}
    return JobConfig.model_validate({
        "algorithm": {"name": alg}, "model": model, "tasks": tasks,
        # sgd for sigma_maml too: the prior is a term of the inner objective (what the peers express)
        "inner": {"steps": steps or w["steps"], "lr": w["lr"], "optimizer": "sgd"},
        "outer": {"meta_batch": meta_batch or w["meta_batch"], "optimizer": "adam", "lr_phi": OUTER_LR,
                  "lr_log_sigma2": OUTER_LR},
        "execution": {"vectorize": vectorize or w["vectorize"], "compile": compile, "device": "cpu", "dtype": dtype},
        "seed": 0}).model_dump()


def omniglot_available() -> bool:
    from datasets.omniglot import default_directory
    return bool(list(Path(default_directory()).glob("images_*.zip")))


# --------------------------------------------------------------------------- peer models (plain nn.Modules)
class PeerMLP(nn.Module):
    """The same function and parameter names as core.models.MLP (fc0 .. fc2), written as a peer user would."""

    def __init__(self, in_dim=1, out_dim=1, hidden=(40, 40)):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        self.n = len(dims) - 1
        for i in range(self.n):
            self.add_module(f"fc{i}", nn.Linear(dims[i], dims[i + 1]))

    def forward(self, x):
        x = x.flatten(1)
        for i in range(self.n):
            x = getattr(self, f"fc{i}")(x)
            if i < self.n - 1:
                x = F.relu(x)
        return x


class PeerConv4(nn.Module):
    """The same function and parameter names as core.models.Conv4 ("strided"): 4 x [3x3 conv stride 2, batch-norm
    on the batch's statistics (no running statistics), ReLU], then a linear head."""

    def __init__(self, in_ch=1, ways=5, channels=64, image_size=28):
        super().__init__()
        for i in range(4):
            self.add_module(f"conv{i}", nn.Conv2d(in_ch if i == 0 else channels, channels, 3, 2, 1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(channels, track_running_stats=False))
        side = image_size
        for _ in range(4):
            side = (side + 1) // 2
        self.head = nn.Linear(channels * side * side, ways)

    channels_last = False  # the torchopt-cl contender: channels-last parameters and inputs

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for i in range(4):
            x = F.relu(getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(x)))
        return self.head(x.flatten(1))


def peer_model(workload: str, phi: dict, dtype) -> nn.Module:
    net = PeerMLP() if WORKLOADS[workload]["family"] == "sinusoid" else PeerConv4()
    names = [n for n, _ in net.named_parameters()]
    if names != list(phi):
        raise AssertionError(f"peer model parameters {names} != ours {list(phi)}")
    net.load_state_dict({k: v.detach().clone() for k, v in phi.items()})
    return net.to(dtype).train()


def loss_fn(workload: str):
    if WORKLOADS[workload]["family"] == "sinusoid":
        return lambda pred, y: ((pred - y) ** 2).mean()
    return F.cross_entropy


# --------------------------------------------------------------------------- the prior, written peer-side
def module_index(names) -> list:
    """Per-layer modules (a layer's weight and bias share sigma^2): the module index of each parameter."""
    layers = [n.rsplit(".", 1)[0] for n in names]
    order = list(dict.fromkeys(layers))
    return [order.index(layer) for layer in layers]


def prior_lams(log_sigma2, index, n_support):
    lam_m = (1.0 / n_support) / log_sigma2.clamp(LOG_S2_MIN, LOG_S2_MAX).exp()
    return [lam_m[i] for i in index]


def prior_term(thetas, phis, lams):
    return sum(0.5 * lam * ((t - p) ** 2).sum() for t, p, lam in zip(thetas, phis, lams))


def ig_penalty(log_sigma2):
    s2 = log_sigma2.clamp(LOG_S2_MIN, LOG_S2_MAX).exp()
    return IG_BETA * (2.0 * torch.log(s2) + IG_BETA / s2).sum()


# --------------------------------------------------------------------------- contenders
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


# --------------------------------------------------------------------------- 1. gradient match
def _maxdiff(a: dict, b: dict) -> float:
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
        out["peers"][name] = {"grad_phi": _maxdiff(gp, ref_phi),
                              "grad_log_sigma2": float((gl - ref_ls).abs().max())}
    ours.step(batch)
    phi1, ls1 = ours.params()
    for name, p in contenders.items():
        p.step(batch)
        pp, pl = p.params()
        out["peers"][name]["step_phi"] = _maxdiff({k: v.detach() for k, v in pp.items()}, phi1)
        out["peers"][name]["step_log_sigma2"] = float((pl.detach() - ls1).abs().max())
    return out


# --------------------------------------------------------------------------- 2./3. interleaved timing
def load1() -> float:
    return round(os.getloadavg()[0], 2)


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def time_workload(workload, alg, peers, min_repeats, max_repeats, budget_s, seed=0, compiled=False) -> dict:
    """Interleaved repeats: one shared batch per repeat, every contender's step on it, plus ours end-to-end.

    Repeats go on while the next one is expected to end within ``budget_s`` (at least ``min_repeats``, at most
    ``max_repeats``). ``ours`` gets the same batches as the peers, so their parameters stay in lockstep (checked
    at the end, float32); the end-to-end step runs on a second trainer of the same config (its own task stream)."""
    ours = Ours(workload, alg)
    ours_e2e = Ours(workload, alg)
    contenders = [ours] + [build_peer(name, workload, alg, ours, torch.float32) for name in peers]
    if compiled:
        contenders.append(OursCompiled(workload, alg))
    fam, mb = ours.trainer.family, ours.trainer.config["outer"]["meta_batch"]
    g = torch.Generator().manual_seed(seed + 99)

    def sample():
        return fam.sample(mb, g).to("cpu", torch.float32)

    warm = sample()
    for c in contenders:  # warm-up: first-call costs (vmap tracing, allocator) are not timed
        c.step(warm)
    ours_e2e.step_e2e()
    names = [c.name for c in contenders]
    rows, begin, last = [], time.perf_counter(), 0.0
    while len(rows) < min_repeats or (len(rows) < max_repeats
                                      and time.perf_counter() - begin + last <= budget_s):
        t_rep = time.perf_counter()
        r = len(rows)
        w0 = time.perf_counter()
        batch = sample()
        t_sample = time.perf_counter() - w0
        entries = [(c.name, (lambda c=c: c.step(batch))) for c in contenders] + [("ours_e2e", ours_e2e.step_e2e)]
        k = r % len(entries)
        wall, cpu = {}, {}
        for name, fn in entries[k:] + entries[:k]:  # the order rotates every repeat
            wall[name], cpu[name] = _timed(fn)
        rows.append({"sample": t_sample, "wall": wall, "cpu": cpu, "load1": load1()})
        last = time.perf_counter() - t_rep
        print(f"  [{workload} {alg} repeat {r + 1}] sample {t_sample * 1e3:.1f} ms, "
              + ", ".join(f"{n} {wall[n] * 1e3:.1f}" for n in names + ["ours_e2e"])
              + f" ms (wall), load1 {rows[-1]['load1']}", flush=True)
    out = summarize(workload, alg, names, rows)
    if compiled:
        out["compile_s"] = round(contenders[-1].compile_s, 1)
    phi, ls = ours.params()
    # conv biases feed batch-norm: their meta-gradient is 0 up to rounding, so Adam moves them by +-lr on noise
    # and they part ways at once; they are reported apart
    noise = [k for k in phi if k.startswith("conv") and k.endswith(".bias")]
    out["lockstep_phi_max_diff"], out["lockstep_conv_bias_max_diff"] = {}, {}
    for c in contenders[1:]:
        pp, pl = c.params()
        pp = {k: v.detach() for k, v in pp.items()}
        d = _maxdiff({k: v for k, v in pp.items() if k not in noise}, phi)
        if c.sigma:
            d = max(d, float((pl.detach() - ls).abs().max()))
        out["lockstep_phi_max_diff"][c.name] = d
        if noise:
            out["lockstep_conv_bias_max_diff"][c.name] = _maxdiff({k: pp[k] for k in noise}, phi)
    out["steps_each"] = len(rows) + 1
    return out


def summarize(workload, alg, names, rows) -> dict:
    peers = [n for n in names if not n.startswith("ours")]

    def med(key, n):
        return statistics.median(r[key][n] for r in rows)

    def ratios(key, extra=0.0):
        if not peers:
            return []
        return [r[key]["ours" if not extra else "ours_e2e"] / min(r[key][n] + (r["sample"] if extra else 0.0)
                                                                  for n in peers) for r in rows]

    wall_r, cpu_r, e2e_r = ratios("wall"), ratios("cpu"), ratios("wall", extra=1.0)
    comp_r = [r["wall"]["ours-compiled"] / min(r["wall"][n] for n in peers) for r in rows] \
        if "ours-compiled" in names and peers else []
    return {"workload": workload, "alg": alg, "repeats": len(rows),
            "median_ms": {n: round(med("wall", n) * 1e3, 2) for n in names},
            "min_ms": {n: round(min(r["wall"][n] for r in rows) * 1e3, 2) for n in names},
            "cpu_median_ms": {n: round(med("cpu", n) * 1e3, 2) for n in names},
            "ratios": [round(x, 3) for x in wall_r],
            "ratio_median": round(statistics.median(wall_r), 3) if wall_r else None,
            "cpu_ratios": [round(x, 3) for x in cpu_r],
            "cpu_ratio_median": round(statistics.median(cpu_r), 3) if cpu_r else None,
            "best_peer_per_repeat": [min(peers, key=lambda n: r["wall"][n]) for r in rows] if peers else [],
            "sample_ms": round(statistics.median(r["sample"] for r in rows) * 1e3, 2),
            "e2e_ms": {"ours": round(med("wall", "ours_e2e") * 1e3, 2),
                       **{n: round(statistics.median(r["sample"] + r["wall"][n] for r in rows) * 1e3, 2)
                          for n in peers}},
            "e2e_ratios": [round(x, 3) for x in e2e_r],
            "e2e_ratio_median": round(statistics.median(e2e_r), 3) if e2e_r else None,
            "compiled_ratios": [round(x, 3) for x in comp_r],
            "compiled_ratio_median": round(statistics.median(comp_r), 3) if comp_r else None,
            "load1": [r["load1"] for r in rows]}


# --------------------------------------------------------------------------- report
def machine_info() -> dict:
    cpu, commit = cpu_name(), code_commit()
    try:  # uncommitted changes to the measured code, named beside the commit
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "core", "schemas", "datasets",
                                "benchmarks/peers.py"], capture_output=True, text=True,
                               cwd=str(ROOT)).stdout.splitlines()
        dirty = [line[3:] for line in dirty]
    except OSError:
        dirty = []
    versions = {"torch": torch.__version__}
    for mod in ("torchopt", "higher", "learn2learn"):
        try:
            importlib.import_module(mod)
            versions[mod] = importlib.metadata.version(mod)
        except Exception as e:
            versions[mod] = f"not installed ({type(e).__name__})"
    try:
        import torchopt
        versions["torchopt_accelerated_op"] = bool(torchopt.accelerated_op_available())
    except Exception:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "commit": commit, "dirty": dirty, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
            "nice": os.nice(0), "loadavg_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "versions": versions}


def _f(v, fmt="{:.1f}"):
    return "-" if v is None else fmt.format(v)


def _cell(t, key, name):
    """A timing cell: empty where the peer was excluded (its meta-gradient differs from ours), '-' if not run."""
    if name in t.get("excluded", []):
        return ""
    return _f(t[key].get(name))


def _e(v):
    return "-" if v is None else f"{v:.1e}"


def _range(t, key):
    xs = t[key]
    return f"{t[key[:-1] + '_median']:.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"


def markdown(info, checks, timings, command, wall, notes) -> str:
    v = info["versions"]
    L = [SECTION, "",
         f"`{command}` (benchmarks/peers.py; `make peers` builds .venv-peers and runs it). Measured "
         f"{info['date']} at commit {info['commit']}"
         + (f" with uncommitted changes to {', '.join(info['dirty'])}" if info.get("dirty") else "")
         + f"; the run took {wall:.0f} s.", "",
         f"Machine: {info['cpu']}, {info['cores']} cores, **shared** with other sessions (their test suites, with "
         f"Celery workers at nice 0, run on it at times); load average {info['loadavg_start']} at the start and "
         f"{info.get('loadavg_end')} at the end, about 2 of it this harness's own threads; the harness at nice "
         f"{info['nice']}. torch {v['torch']}, "
         f"intra-op threads {info['threads']}, inter-op {info['interop_threads']}; Python {info['python']}; "
         f"torchopt {v.get('torchopt')} (its C++ ops "
         f"{'loaded' if v.get('torchopt_accelerated_op') else 'do not load against this torch, so its pure-Python ops ran'}), "
         f"higher {v.get('higher')}, learn2learn {v.get('learn2learn')}.", "",
         "Same model shapes and initial parameters, the same task tensors (sampled once per repeat with Metashrink's "
         "sampler and given to every contender), the same inner learning rate and steps, second-order MAML, Adam "
         "outer step. All contenders run interleaved in one process, and the order rotates every repeat. Times are "
         "medians over the repeats of one meta-step (wall). ratio = ours / best peer, computed per repeat (time: "
         "< 1 means ours is faster) and given as the median (range). CPU ratio is the same for process CPU time "
         "(all threads). Because the machine was shared, the per-repeat ratios "
         "mean more than the absolute times. A repeat in which another job's burst hit some contenders and not "
         "others shows up as an outlier in the range; the median is robust to a few of them. An empty cell is a peer left out because its meta-gradient differs from ours (gradient table "
         "below).", "",
         "### Meta-step on a given batch (compute only)", "",
         "| workload | algorithm | torchopt (loop) ms | torchopt (loop, channels-last) ms | torchopt (vmap) ms | higher ms | ours ms | ratio ours / best peer | CPU ratio | ours compiled ms | ratio compiled / best peer | compile s | n |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for t in timings:
        L.append(f"| {WORKLOADS[t['workload']]['label']} | {t['alg']} | {_cell(t, 'median_ms', 'torchopt')} | "
                 f"{_cell(t, 'median_ms', 'torchopt-cl')} | {_cell(t, 'median_ms', 'torchopt-vmap')} | {_cell(t, 'median_ms', 'higher')} | "
                 f"{_f(t['median_ms']['ours'])} | {_range(t, 'ratios')} | {_range(t, 'cpu_ratios')} | "
                 f"{_f(t['median_ms'].get('ours-compiled'))} | {_range(t, 'compiled_ratios')} | "
                 f"{_f(t.get('compile_s'))} | {t['repeats']} |")
    L += ["", "### End-to-end meta-step including task sampling", "",
          "ours: the unmodified `MetaTrainer.step()` on a second trainer of the same config (it draws its own tasks), "
          "timed in every repeat among the others. A peer: that repeat's sampling time (Metashrink's sampler, the same "
          "call) plus its compute step.", "",
          "| workload | algorithm | sampling ms | torchopt (loop) ms | torchopt (loop, channels-last) ms | torchopt (vmap) ms | higher ms | ours ms | ratio ours / best peer |",
          "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for t in timings:
        L.append(f"| {WORKLOADS[t['workload']]['label']} | {t['alg']} | {_f(t['sample_ms'], '{:.2f}')} | "
                 f"{_cell(t, 'e2e_ms', 'torchopt')} | {_cell(t, 'e2e_ms', 'torchopt-cl')} | "
                 f"{_cell(t, 'e2e_ms', 'torchopt-vmap')} | "
                 f"{_cell(t, 'e2e_ms', 'higher')} | {_f(t['e2e_ms']['ours'])} | {_range(t, 'e2e_ratios')} |")
    L += ["", "Per repeat (compute, wall): the ratios, the fastest peer, the best (min) ms of each contender, and "
          "the 1-minute load. Lockstep: every contender got the same batches, so all train the same parameters. "
          "The figure is the largest float32 difference between ours' parameters and each peer's after all timed "
          "steps. Adam moves every coordinate by about lr = 1e-3 whatever the size of its gradient, so coordinates "
          "whose meta-gradient is near 0 follow rounding noise and can drift apart by up to 2 x lr x steps. conv4's "
          "conv biases are such coordinates exactly (they feed batch-norm, so their meta-gradient is 0 up to "
          "rounding) and are listed apart. The test of sameness is the float64 check below.", ""]
    for t in timings:
        mins = ", ".join(f"{n} {v:.1f}" for n, v in t["min_ms"].items())
        drift = ", ".join(f"{n} {d:.1e}" for n, d in t["lockstep_phi_max_diff"].items())
        if t["lockstep_conv_bias_max_diff"]:
            drift += " (conv biases: " + ", ".join(f"{n} {d:.1e}" for n, d in
                                                   t["lockstep_conv_bias_max_diff"].items()) + ")"
        fastest = ", ".join(f"{n} {t['best_peer_per_repeat'].count(n)}/{t['repeats']}"
                            for n in dict.fromkeys(t["best_peer_per_repeat"]))
        L.append(f"- {t['workload']} {t['alg']}: ratios {[round(x, 2) for x in t['ratios']]}; fastest peer {fastest}; "
                 f"best ms: {mins}; load1 {min(t['load1'])}-{max(t['load1'])}; lockstep after {t['steps_each']} "
                 f"steps: {drift}"
                 + (f"; not timed (gradient differs): {', '.join(t['excluded'])}" if t.get("excluded") else ""))
    L += ["", "### Gradient match (float64, one fixed batch)", "",
          "The largest absolute difference from ours, for the meta-gradient (phi; log sigma^2) and for the "
          "parameters after one whole outer step (Adam, inverse-Gamma penalty, clamp). mb is the number of tasks "
          "in the checked batch: the whole meta-batch for sinusoid, 4 tasks for conv4 (float64 conv4 second order "
          "runs at about 1 s per task and step here). `torch` is a hand-written autograd unroll that needs no package; "
          "tests/test_peers_harness.py also checks it in the main venv. scale = max |ours' meta-gradient|. A peer "
          f"whose meta-gradient differs by more than {MATCH_TOL:g} x max(1, scale) is not timed on that workload.", "",
          "| workload | algorithm | mb | scale | peer | grad phi | grad log sigma^2 | step phi | step log sigma^2 |",
          "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for c in checks:
        for name, d in c["peers"].items():
            L.append(f"| {c['workload']} | {c['alg']} | {c['meta_batch']} | {c['grad_scale']:.1e} | {name} | "
                     f"{_e(d['grad_phi'])} | {_e(d['grad_log_sigma2'])} | {_e(d['step_phi'])} | "
                     f"{_e(d['step_log_sigma2'])} |")
    if notes:
        L += ["", "### Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(L) + "\n"


NOTES = [
    "learn2learn: not in the table. `pip install learn2learn==0.2.0` (the newest release, an sdist only) fails "
    "to build on Python 3.11: its shipped Cython output includes `longintrepr.h`, which Python 3.11 moved "
    "(`fatal error: longintrepr.h: No such file or directory`); `make peers` tries it and goes on without it.",
    "sigma_maml: the peers take gradient steps on support loss + prior (`inner.optimizer: sgd` for ours too); "
    "Metashrink's default for sigma_maml is `proximal_gd` (the prior as a proximal step), which is not timed here. "
    "With 1 inner step theta = phi at the only inner gradient, so the prior contributes nothing and the "
    "log sigma^2 meta-gradient is 0 for every contender (omniglot-1 sigma_maml is MAML's work plus the prior's "
    "bookkeeping).",
    "torchopt (vmap) on conv4: left out of the timing, its meta-gradient differs from ours by 1e-3 to 8e-2 "
    "(float64, table above) while the loop peers agree to 1e-15. Reduced: reverse-mode *outside* torch.func.vmap "
    "of a per-task loss that takes an inner torch.func.grad through F.batch_norm on batch statistics (torchopt's "
    "FuncTorch example: vmap the task losses, then .backward() on their mean) is wrong in torch 2.13.0 (it even "
    "gives conv biases before batch-norm a non-zero meta-gradient); the same function without batch-norm, or with "
    "the outer gradient *inside* the vmap (vmap of grad, what MetaTrainer's vmap mode does: it matches its loop "
    "mode to 6e-16), agrees with the loop to 1e-17. Probably the batch-norm backward batching rule "
    "(pytorch/functorch issue 534, open). Sinusoid (no batch-norm) is unaffected and timed.",
    "What ours does on conv4 (core/trainer.py `_map_tasks`, core/algorithms.py `Backprop.eager_task_update`, "
    "core/models.py): the per-task loop runs its tasks on parallel threads, one per intra-op thread (here 2), "
    "each with one intra-op thread; each task's update is plain autograd (torch.autograd.grad with "
    "create_graph, like the peers; torch.func's grad of grad took 1.22x the loop peers' time in this harness at "
    "fa28324); the convolutions run on "
    "channels-last memory (`model.channels_last`, default true) and the first layer of a one-channel input is "
    "an im2col matrix product (oneDNN's one-channel convolution is slow per FLOP on CPU). Same function and "
    "meta-gradient (table above). The peers run as their examples write them: NCHW, one task at a time on both "
    "intra-op threads.",
    "ours-compiled: a second trainer of ours with `execution.compile: true`, the path the default "
    "(`compile: \"auto\"`) takes for a job long enough to repay the compile (benchmarks/RESULTS.md, \"Compile "
    "cache\"): sinusoid compiles the whole vmapped meta-step, conv4 one task's update (the loop stays in Python "
    "and runs its tasks on the task threads, as eager does; the first task compiles alone at one intra-op thread). Its first step compiled with a cold cache "
    "(compile s, not in the step times; the cache makes later jobs of the shape start in ~3 s). The peers "
    "cannot be compiled the same way (torch.compile does not take autograd.grad(create_graph=True) inside a "
    "compiled region), so they run eager.",
    "ours runs vmap for sinusoid and the per-task loop for conv4 (execution.vectorize; the faster of the two for "
    "each in benchmarks/core_bench.py); torchopt runs both ways (loop: MetaSGD; vmap: functional torchopt.sgd + "
    "torch.func), higher has no vmap form.",
]


# per workload: (min repeats, max repeats, seconds of timing per algorithm); the full run stays near 15 minutes
# on 2 shared cores however busy they are (a repeat of omniglot-5 is 4 meta-steps of 2.5-10 s each)
SCHEDULE = {"sinusoid": (15, 40, 25.0), "omniglot-1": (7, 15, 90.0), "omniglot-5": (5, 9, 170.0)}
SCHEDULE_QUICK = {"sinusoid": (3, 3, 0.0), "omniglot-1": (1, 1, 0.0), "omniglot-5": (0, 0, 0.0)}


def peers_for(workload: str, peers: list) -> list:
    return [p for p in peers if WORKLOADS[workload]["family"] != "sinusoid" or p not in CONV_ONLY]


def check_meta_batch(workload: str, quick: bool) -> int:
    """Tasks in the float64 gradient check: the workload's meta-batch for sinusoid; 4 for conv4 (float64 conv4
    second order costs ~1 s per task and step here: the whole 32 would take minutes); fewer with --quick."""
    if WORKLOADS[workload]["family"] == "sinusoid":
        return 4 if quick else WORKLOADS[workload]["meta_batch"]
    return 2 if quick else 4


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run (~2 min): few repeats, small gradient checks")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--repeats", type=str, default=None,
                    help="fixed repeats per workload as sinusoid,omniglot-1,omniglot-5 (default: SCHEDULE, "
                         "time-budgeted; --quick 3,1,0: omniglot-5 is then only gradient-checked, not timed)")
    ap.add_argument("--only", nargs="*", choices=tuple(WORKLOADS), help="run only these workloads")
    ap.add_argument("--algs", nargs="*", choices=ALGS, default=list(ALGS))
    ap.add_argument("--no-write", action="store_true", help="do not touch benchmarks/RESULTS.md")
    ap.add_argument("--no-compiled", action="store_true",
                    help="leave out ours-compiled (execution.compile true; ~25-35 s of compiling per workload)")
    ap.add_argument("--json", type=str, default=None, help="also write the JSON result to this file")
    ap.add_argument("--render", type=str, default=None, metavar="JSON",
                    help="measure nothing: write the Peers section from a saved JSON result of this script (the "
                         "numbers and the command stay those of that run; the wording is this version's)")
    args = ap.parse_args(argv)
    if args.render:
        r = json.loads(Path(args.render).read_text())
        md = markdown(r["machine"], r["checks"], r["timings"], r["command"], r["wall_s"],
                      list(NOTES) + r.get("extra_notes", []))
        print(md)
        if not args.no_write:
            write_section(md)
        return
    torch.set_num_threads(args.threads)
    if not args.no_compiled:  # cold compiles: torch's caches in a fresh directory
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="peers-inductor-")
    schedule = dict(SCHEDULE_QUICK if args.quick else SCHEDULE)
    if args.repeats:
        schedule.update({w: (int(n), int(n), 0.0) for w, n in zip(WORKLOADS, args.repeats.split(","))})
    workloads = list(args.only or WORKLOADS)
    extra_notes = []  # what this run found missing; NOTES are fixed text
    if any(WORKLOADS[w]["family"] == "omniglot" for w in workloads) and not omniglot_available():
        extra_notes.append("Omniglot zips not found: the conv4 workloads were skipped.")
        workloads = [w for w in workloads if WORKLOADS[w]["family"] != "omniglot"]
    peers = [p for p in PEER_NAMES if available(p)]
    for p in PEER_NAMES:
        if p not in peers:
            extra_notes.append(f"{p}: its package is not importable in this interpreter ({sys.executable}); "
                               "column empty.")
    info = machine_info()
    print(json.dumps({"machine": info, "peers": peers}), flush=True)
    command = ("PYTHONPATH=. nice -n 10 .venv-peers/bin/python benchmarks/peers.py"
               + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])))
    t_start = time.perf_counter()
    checks, timings = [], []
    for w in workloads:
        for alg in args.algs:
            t0 = time.perf_counter()
            mb = check_meta_batch(w, args.quick)
            c = gradient_check(w, alg, ["torch"] + peers_for(w, peers), meta_batch=mb)
            print(f"[check {w} {alg} {time.perf_counter() - t0:.1f} s] {json.dumps(c)}", flush=True)
            checks.append(c)
    excluded = {}
    for c in checks:  # a peer that computes a different meta-gradient is not timed on that workload
        tol = MATCH_TOL * max(1.0, c["grad_scale"])
        bad = [n for n, d in c["peers"].items() if n in peers and max(d["grad_phi"], d["grad_log_sigma2"]) > tol]
        if bad:
            excluded[(c["workload"], c["alg"])] = bad
    for w in workloads:
        if schedule[w][1] < 1:
            continue
        for alg in args.algs:
            t0 = time.perf_counter()
            t = time_workload(w, alg, [p for p in peers_for(w, peers) if p not in excluded.get((w, alg), [])],
                              *schedule[w], compiled=not args.no_compiled)
            t["excluded"] = excluded.get((w, alg), [])
            print(f"[time {w} {alg} {time.perf_counter() - t0:.1f} s] {json.dumps(t)}", flush=True)
            timings.append(t)
    wall = time.perf_counter() - t_start
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    notes = list(NOTES) + extra_notes
    md = markdown(info, checks, timings, command, wall, notes)
    print(md)
    if not args.no_write:
        write_section(md)
    result = {"machine": info, "command": command, "wall_s": round(wall, 1), "checks": checks, "timings": timings,
              "notes": notes, "extra_notes": extra_notes}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
