"""The peer harness's workloads (the same model shapes, initial parameters and task tensors for every contender),
the plain nn.Module models a peer trains, and the sigma-MAML prior written peer-side (per-layer modules, lambda =
1 / (n sigma^2), the clamp, the inverse-Gamma penalty), as benchmarks/peers.py describes them."""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from schemas import JobConfig

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
