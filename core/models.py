"""Architectures, used only through ``torch.func.functional_call(model, params, x)``.

Parameters live outside the modules as plain ``dict[str, Tensor]``. Batch-norm layers use the statistics
of the batch they see (transductive, as in MAML) and keep no running statistics
(``track_running_stats=False``): the support set is normalised with its own statistics during adaptation
and the query set with its own at prediction time.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid}
# the same functions without a module call per use (the adapt loop calls them thousands of times per request)
ACTIVATION_FNS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu, "sigmoid": torch.sigmoid}


class MLP(nn.Module):
    """``fc0 .. fc{L-1}`` hidden layers and ``fc{L}`` the output layer."""

    row_independent = True  # each input row's output depends on that row alone (zero rows may pad a batch)

    def __init__(self, in_dim: int, out_dim: int, hidden=(40, 40), activation: str = "relu"):
        super().__init__()
        dims = [in_dim, *hidden, out_dim]
        for i in range(len(dims) - 1):
            self.add_module(f"fc{i}", nn.Linear(dims[i], dims[i + 1]))
        self.n_layers = len(dims) - 1
        self.act = ACTIVATIONS[activation]()
        self.act_fn = ACTIVATION_FNS[activation]

    def forward(self, x):
        return self.functional({k: v for k, v in self.named_parameters()}, x)

    def functional(self, params, x):
        """The same function as ``functional_call(self, params, (x,))`` without swapping module state."""
        x = x.flatten(1)
        for i in range(self.n_layers):
            x = F.linear(x, params[f"fc{i}.weight"], params[f"fc{i}.bias"])
            if i < self.n_layers - 1:
                x = self.act_fn(x)
        return x


class Conv4(nn.Module):
    """Four blocks of [3x3 conv, batch-norm, ReLU] and a linear ``head``.

    ``strided``: stride-2 convolutions, no pooling (few-shot Omniglot of Finn et al., paper App. E.4.1).
    ``maxpool``: stride-1 convolutions followed by 2x2 max-pooling (many-shot Omniglot, App. E.1).
    ``amp`` (``execution.amp``): the convolutions run under bfloat16 autocast on the input's device; batch-norm,
    ReLU, pooling and the head stay in the input's dtype (normalisation in bf16 loses the batch statistics'
    precision, and ``vmap`` of ``grad`` fails on a bf16 batch-norm with float32 affine parameters).
    """

    row_independent = False  # batch-norm normalises with the statistics of the rows it sees

    def __init__(self, in_shape, out_dim: int, channels: int = 64, variant: str = "strided",
                 channels_last: bool = False, amp: bool = False):
        super().__init__()
        c_in = in_shape[0]
        self.variant = variant
        self.channels_last = channels_last
        self.amp = amp
        stride = 2 if variant == "strided" else 1
        for i in range(4):
            self.add_module(f"conv{i}", nn.Conv2d(c_in if i == 0 else channels, channels, 3, stride, 1))
            self.add_module(f"bn{i}", nn.BatchNorm2d(channels, track_running_stats=False))
        with torch.no_grad():
            n_feat = self.features(torch.zeros(2, *in_shape)).shape[1]
        self.head = nn.Linear(n_feat, out_dim)

    def features(self, x, params=None):
        p = params if params is not None else dict(self.named_parameters())
        if self.channels_last and not torch._C._functorch.is_batchedtensor(x):
            # not under torch.func.vmap: a BatchedTensor cannot report a memory format ("NYI: querying
            # is_contiguous inside of vmap"); vmapped convolutions are grouped and keep their own layout
            x = x.contiguous(memory_format=torch.channels_last)
        stride = 2 if self.variant == "strided" else 1
        dtype = x.dtype
        for i in range(4):
            if i == 0 and x.shape[-3] == 1 and not self.amp:
                x = _conv_one_channel(x, p["conv0.weight"], p["conv0.bias"], stride)
            elif self.amp:
                with torch.autocast(x.device.type, dtype=torch.bfloat16):
                    x = F.conv2d(x, p[f"conv{i}.weight"], None, stride, 1)
                x = x.to(dtype) + p[f"conv{i}.bias"].view(-1, 1, 1)
            else:
                x = F.conv2d(x, p[f"conv{i}.weight"], p[f"conv{i}.bias"], stride, 1)
            # batch statistics, no running statistics (transductive, as MAML)
            x = F.relu(F.batch_norm(x, None, None, p[f"bn{i}.weight"], p[f"bn{i}.bias"], True, 0.0, 1e-5))
            if self.variant == "maxpool" and x.shape[-1] >= 2:
                x = F.max_pool2d(x, 2)
        return x.flatten(1)

    def forward(self, x):
        return self.functional(dict(self.named_parameters()), x)

    def functional(self, params, x):
        """The same function as ``functional_call(self, params, (x,))`` without swapping module state."""
        return F.linear(self.features(x, params), params["head.weight"], params["head.bias"])


def _conv_one_channel(x, weight, bias, stride):
    """``F.conv2d(x, weight, bias, stride, padding=1)`` for a one-channel input (grey images) as im2col and one
    matrix product, the output in channels-last memory (oneDNN's convolution of a single input channel is far
    slower per FLOP on CPU than its 64-channel layers); the same
    function (to 4e-15 in float64, tests/test_core_numerics.py), vmaps (im2col has a batching rule)."""
    n, _, h, w = x.shape
    k = weight.shape[-1]
    ho, wo = (h + 2 - k) // stride + 1, (w + 2 - k) // stride + 1
    cols = F.unfold(x, k, padding=1, stride=stride)  # [n, k*k, ho*wo]
    out = F.linear(cols.transpose(1, 2), weight.reshape(weight.shape[0], -1), bias)  # [n, ho*wo, c]: one addmm
    return out.view(n, ho, wo, -1).permute(0, 3, 1, 2)


class Identity(nn.Module):
    """Task parameters that are the distribution parameters themselves (paper App. A and C).

    One scalar parameter per dimension (``theta.0`` .. ``theta.{D-1}``), so ``per_tensor`` gives the
    per-dimension modules of App. C and ``per_layer`` one module. ``forward`` ignores the values of ``x``
    and returns ``transform(theta)`` for every row of ``x``: the mean of the observations.
    """

    row_independent = True

    def __init__(self, dim: int, transform: Optional[Callable] = None):
        super().__init__()
        self.theta = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in range(dim)])
        self.transform = transform

    def forward(self, x):
        return self.functional(dict(self.named_parameters()), x)

    def functional(self, params, x):
        theta = torch.stack([params[f"theta.{i}"] for i in range(len(self.theta))])
        mu = self.transform(theta) if self.transform is not None else theta
        return mu.unsqueeze(0).expand(x.shape[0], mu.shape[0])


def apply(model: nn.Module, params: dict, x):
    """``functional_call(model, params, (x,))``, through the model's own pure ``functional`` where it has one
    (no per-call swap of module state: several times faster for small models)."""
    fn = getattr(model, "functional", None)
    return fn(params, x) if fn is not None else functional_call(model, params, (x,))


def build_model(cfg: dict, family, amp: bool = False) -> nn.Module:
    """``amp`` (``execution.amp``) applies to conv archs only (the schema refuses it elsewhere)."""
    arch = cfg["arch"]
    if arch == "mlp":
        return MLP(math.prod(family.input_shape), family.output_dim, cfg["hidden"], cfg["activation"])
    if arch == "conv4":
        return Conv4(family.input_shape, family.output_dim, cfg["channels"], cfg["variant"], cfg["channels_last"],
                     amp=amp)
    if arch == "identity":
        return Identity(family.param_dim, family.transform)
    raise ValueError(f"unknown model arch {arch!r}")


def init_params(model: nn.Module, generator: torch.Generator, dtype=torch.float32) -> dict:
    """Fresh parameters drawn from ``generator`` (PyTorch's default init schemes), detached."""
    params = {}
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
        for m in model.modules():
            if hasattr(m, "reset_parameters") and m is not model:
                m.reset_parameters()
    finally:
        torch.random.set_rng_state(state)
    for name, p in model.named_parameters():
        params[name] = p.detach().clone().to(dtype)
    return params
