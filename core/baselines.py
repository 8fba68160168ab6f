"""The comparison meta-learners of the seed papers, each with its own meta-learned tensors and inner rule.

All of them backpropagate through an unrolled inner loop of plain gradient steps whose rule the algorithm
owns; the extra meta-learned tensors live in ``meta["extra"]`` (see ``core.algorithms.Algorithm``):

- ``meta_sgd`` (Li et al. 2017; shrinkage paper App. C): theta <- theta - alpha (.) grad, with alpha one
  learning rate per parameter entry (``granularity: "parameter"``) or one per module of the partition
  (``"module"``), meta-learned with phi. Extras ``alpha.<param or module>``.
- ``tnet`` / ``mtnet`` (Lee & Choi 2018, Eqs. 3-14): every linear/conv layer computes T (W x + b) with a
  meta-learned square T (identity init; for conv4 a 1x1 transformation of the output channels) and only
  W, b adapt (Eq. 4). MT-net masks the inner gradient by rows, M_j = sigmoid((zeta_j + g1 - g2) / tau)
  (Eq. 11, the two-class Gumbel-softmax with two Gumbel(0, 1) samples per row), one mask per task; at
  meta-test the hard mask 1[zeta_j > 0]. Extras ``T.<layer>``, ``zeta.<layer>``.
- ``hyper_representation`` (Franceschi et al. 2018, Sec. 3-4): the body of the mlp/conv4 is the meta-learned
  representation h(x, lambda); the output layer is the per-task ground model w, started at 0 and trained by
  T = inner.steps gradient steps of size eta (meta-learned, extra ``eta``) on the support loss (squared error
  for regression, softmax cross-entropy for classification); the hypergradient for lambda and eta is the
  reverse-mode derivative through those unrolled dynamics.

- ``hypernet`` (MH, meta-learning via hypernetworks): hidden-layer weights W_l = sum_k e_{l,k} Template_{l,k};
  the inner loop adapts the task embeddings e_l (and the head), the outer loop learns the templates (extras
  ``template.<layer>``) and the initial embeddings; see ``HyperNet``.

Inner optimizer: all five use plain gradient steps (``inner.optimizer`` must be ``sgd``); ``inner.lr`` is the
initial Meta-SGD alpha and hyper-representation eta, and the fixed step size alpha of T-net / MT-net / MH.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch.func import grad, grad_and_value
from torch.nn import functional as F

from .registry import Algorithm, register
from .models import MLP, Conv4, apply


class Unrolled(Algorithm):
    """Backprop through ``inner_steps`` steps of the algorithm's own rule.

    Hooks: ``forward(params, extra, x)``, ``adapted(names)`` (which parameters the inner loop moves),
    ``init_theta(phi, extra, names)``, ``context(extra, noise)`` (per-task quantities fixed during the inner
    loop, e.g. MT-net's masks; ``noise=None`` means meta-test), ``step(theta, g, extra, ctx, scale)``.
    ``MetaModel.adapt`` runs the same hooks with detached steps.
    """
    custom_adapt = True

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.name = cfg["name"]
        if learner.inner.name != "sgd":
            raise ValueError(f"{self.name} uses plain gradient inner steps; inner.optimizer must be 'sgd'")
        self.lr = float(learner.lr if learner.lr is not None else 0.01)

    # -------------------------------------------------------------- hooks
    def forward(self, params, extra, x):
        return apply(self.learner.model, params, x)

    def loss(self, params, extra, x, y):
        return self.learner.family.loss(self.forward(params, extra, x), y)

    def adapted(self, names):
        return list(names)

    def init_theta(self, phi, extra, names):
        return {k: phi[k] for k in names}

    def context(self, extra, noise=None):
        return None

    def step(self, theta, g, extra, ctx, scale=1.0):
        return {k: theta[k] - scale * self.lr * g[k] for k in theta}

    # -------------------------------------------------------------- the unrolled loop
    def unroll(self, phi, extra, xs, ys, ctx, steps=None, names=None):
        names = self.adapted(phi if names is None else names)
        frozen = {k: v for k, v in phi.items() if k not in names}
        theta = self.init_theta(phi, extra, names)
        for _ in range(self.learner.inner_steps if steps is None else steps):
            g = grad(lambda th: self.loss({**frozen, **th}, extra, xs, ys))(theta)
            theta = self.step(theta, g, extra, ctx)
        return {**frozen, **theta}

    def task_update(self, meta, xs, ys, xq, yq, *noise):
        def query_loss(phi, extra):
            ctx = self.context(extra, noise[0] if noise else None)
            return self.loss(self.unroll(phi, extra, xs, ys, ctx), extra, xq, yq)

        (d_phi, d_extra), loss = grad_and_value(query_loss, argnums=(0, 1))(meta["phi"], meta["extra"])
        delta = {"phi": d_phi, "log_sigma2": torch.zeros_like(meta["log_sigma2"]), "extra": d_extra}
        return delta, {"query_loss": loss, **self.metrics(meta["extra"])}

    def metrics(self, extra):
        return {}


# ------------------------------------------------------------------------------------------ Meta-SGD
class MetaSGD(Unrolled):
    """Deviation: Li et al. draw the initial alpha at random (U[0.005, 0.1]); here every alpha starts at
    ``init_lr`` (default inner.lr), so a Meta-SGD job starts exactly as MAML with that learning rate."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.granularity = cfg.get("granularity", "parameter")
        self.init_lr = float(cfg.get("init_lr") or self.lr)

    def init_extra(self, phi):
        if self.granularity == "module":
            ref = next(iter(phi.values()))
            return {f"alpha.{m}": torch.full((), self.init_lr, dtype=ref.dtype, device=ref.device)
                    for m in self.learner.partition.names}
        return {f"alpha.{k}": torch.full_like(v, self.init_lr) for k, v in phi.items()}

    def alpha(self, extra, k):
        if self.granularity == "module":
            return extra[f"alpha.{self.learner.partition.names[self.learner.partition.index[k]]}"]
        return extra[f"alpha.{k}"]

    def step(self, theta, g, extra, ctx, scale=1.0):
        return {k: theta[k] - scale * self.alpha(extra, k) * g[k] for k in theta}

    def metrics(self, extra):
        return {"alpha_mean": torch.stack([v.mean() for v in extra.values()]).mean()}


# ------------------------------------------------------------------------------------------ T-net / MT-net
def _layers(model):
    """(layer name, number of output rows) of the layers that get a T: every linear/conv layer."""
    if isinstance(model, MLP):
        return [(f"fc{i}", getattr(model, f"fc{i}").out_features) for i in range(model.n_layers)]
    if isinstance(model, Conv4):
        return [(f"conv{i}", getattr(model, f"conv{i}").out_channels) for i in range(4)] + \
            [("head", model.head.out_features)]
    raise ValueError("tnet / mtnet / hyper_representation need model.arch 'mlp' or 'conv4'")


class TNet(Unrolled):
    """y = T (W x + b) per layer (Eq. 3 with the bias inside), T meta-learned, W and b adapted (Eq. 4).

    Conv4: T is a 1x1 transformation of the conv output's channels, applied before batch-norm; the
    batch-norm scale/shift are meta-learned and adapted like W (the paper does not say; MAML adapts them)."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.layers = _layers(learner.model)

    def init_extra(self, phi):
        ref = next(iter(phi.values()))
        return {f"T.{n}": torch.eye(r, dtype=ref.dtype, device=ref.device) for n, r in self.layers}

    def forward(self, params, extra, x):
        model = self.learner.model
        if isinstance(model, MLP):
            x = x.flatten(1)
            for i in range(model.n_layers):
                x = F.linear(F.linear(x, params[f"fc{i}.weight"], params[f"fc{i}.bias"]), extra[f"T.fc{i}"])
                if i < model.n_layers - 1:
                    x = model.act(x)
            return x
        stride = 2 if model.variant == "strided" else 1
        for i in range(4):
            x = F.conv2d(x, params[f"conv{i}.weight"], params[f"conv{i}.bias"], stride, 1)
            x = torch.einsum("oc,bchw->bohw", extra[f"T.conv{i}"], x)  # the 1x1 channel transformation
            x = F.relu(F.batch_norm(x, None, None, params[f"bn{i}.weight"], params[f"bn{i}.bias"], True, 0.0, 1e-5))
            if model.variant == "maxpool" and x.shape[-1] >= 2:
                x = F.max_pool2d(x, 2)
        return F.linear(F.linear(x.flatten(1), params["head.weight"], params["head.bias"]), extra["T.head"])


class MTNet(TNet):
    """Deviation: at meta-test the paper samples M ~ Bern(sigmoid(zeta)) (Eq. 9) per task; we use the most
    probable hard mask 1[zeta_j > 0] so that a published model adapts deterministically."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        self.tau = float(cfg.get("temperature", 1.0))
        self.init_zeta = float(cfg.get("init_zeta", 0.0))
        self.rows = sum(r for _, r in self.layers)

    def init_extra(self, phi):
        extra = super().init_extra(phi)
        ref = next(iter(phi.values()))
        extra.update({f"zeta.{n}": torch.full((r,), self.init_zeta, dtype=ref.dtype, device=ref.device)
                      for n, r in self.layers})
        return extra

    def noise(self, n_tasks, generator, dtype, device):
        """Two Gumbel(0, 1) samples per mask row and task (Eq. 10): [n_tasks, 2, rows]."""
        u = torch.rand(n_tasks, 2, self.rows, generator=generator, dtype=torch.float64)
        u = u.clamp(1e-12, 1 - 1e-12)
        return (-torch.log(-torch.log(u))).to(device, dtype),

    def context(self, extra, noise=None):
        """Per-layer row masks: relaxed (Eq. 11) with noise, hard 1[zeta > 0] without."""
        masks, i = {}, 0
        for n, r in self.layers:
            zeta = extra[f"zeta.{n}"]
            if noise is None:
                masks[n] = (zeta > 0).to(zeta.dtype)
            else:
                masks[n] = torch.sigmoid((zeta + noise[0, i:i + r] - noise[1, i:i + r]) / self.tau)
            i += r
        return masks

    def mask_for(self, name, masks, like):
        layer = name.rsplit(".", 1)[0]
        if layer not in masks:  # batch-norm parameters: not masked
            return None
        m = masks[layer]
        return m.reshape(m.shape[0], *([1] * (like.dim() - 1)))

    def step(self, theta, g, extra, ctx, scale=1.0):
        out = {}
        for k in theta:
            m = self.mask_for(k, ctx, theta[k])
            out[k] = theta[k] - scale * self.lr * (g[k] if m is None else m * g[k])
        return out

    def metrics(self, extra):
        z = torch.cat([extra[f"zeta.{n}"] for n, _ in self.layers])
        return {"update_fraction": (z > 0).to(z.dtype).mean()}


# ------------------------------------------------------------------------------------------ hyper-representation
class HyperRepresentation(Unrolled):
    """Deviations: eta is learned directly (not its logarithm) and no ground-model regulariser is used."""

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        model = learner.model
        _layers(model)
        head = f"fc{model.n_layers - 1}" if isinstance(model, MLP) else "head"
        self.head = [f"{head}.weight", f"{head}.bias"]
        self.init_eta = float(cfg.get("init_eta") or self.lr)

    def prepare_phi(self, phi):
        # the ground model starts at w = 0; phi's head is never used otherwise, so predict() before
        # adaptation is the w = 0 model
        return {k: torch.zeros_like(v) if k in self.head else v for k, v in phi.items()}

    def init_extra(self, phi):
        ref = next(iter(phi.values()))
        return {"eta": torch.tensor(self.init_eta, dtype=ref.dtype, device=ref.device)}

    def adapted(self, names):
        return [k for k in names if k in self.head]

    def init_theta(self, phi, extra, names):
        return {k: torch.zeros_like(phi[k]) for k in names}

    def step(self, theta, g, extra, ctx, scale=1.0):
        return {k: theta[k] - scale * extra["eta"] * g[k] for k in theta}

    def metrics(self, extra):
        return {"eta": extra["eta"]}




# ------------------------------------------------------------------------------------------ MH (hypernetworks)
EMBEDDING_SIZES = {"compressed": 0.25, "comparable": 1.0, "overparametrised": 2.0}


def embedding_size(spec, width: int) -> int:
    """The task-embedding dimension K of a layer with ``width`` output units (rows / channels)."""
    if isinstance(spec, str):
        return max(1, int(round(EMBEDDING_SIZES[spec] * width)))
    return int(spec)


class HyperNet(Unrolled):
    """MH, meta-learning via hypernetworks (Zhao et al., supplementary material: App. A).

    Every hidden layer l (MLP ``fc0 .. fc{L-2}``, conv4 ``conv0 .. conv3``) has its weight generated by a
    linear hypernetwork from a task embedding e_l in R^K: W_l = sum_k e_{l,k} Template_{l,k} (the W = theta alpha
    of the paper's NQM analysis, App. B), plus the layer's ordinary bias. For conv4 the templates generate the
    3x3 kernels. The inner loop takes ``inner.steps`` plain gradient steps of size ``inner.lr`` on the
    embeddings and, with ``adapt_head``, on the output layer; the outer loop learns the templates
    (``meta["extra"]["template.<layer>"]``, at ``outer.lr_extra``) and, as phi, the initial embeddings, the
    biases / batch-norm parameters and the head.

    Storage: phi keeps the model's parameter names, so the partition (and ``MetaModel.adapt(modules=...)``)
    sees the usual modules; ``<layer>.weight`` of a hidden layer holds its embedding e_l (shape [K]) instead
    of the weight. The head (``fc{L-1}`` / ``head``) is its own module, so the frozen-features evaluation of
    App. A.3 (templates and embeddings fixed, only the head adapts) is ``MetaModel.adapt(..., modules=[head])``.

    Deviations from the paper:
    - the hypernetwork is linear in the embedding (the paper's NQM form), not the MLP hypernetwork of its
      experiments; its "compressed / comparable / overparametrised" sizes compare the hypernetwork with the
      main network, which a linear template bank (always >= the layer's size) cannot express, so here they set
      K relative to each layer's width: K = width / 4, width, 2 width (or an explicit int);
    - biases and batch-norm parameters are meta-learned but not generated and not adapted;
    - init: templates are U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default layer init) and e_l = 1/sqrt(K),
      so the generated W_l has the default init's scale; the template draw is seeded from the job's
      initial phi (biases, head), i.e. deterministically from the job seed;
    - ``adapt_head: false`` excludes the head from every adaptation, so frozen-features needs the default true.
    """

    def __init__(self, learner, cfg):
        super().__init__(learner, cfg)
        model = learner.model
        _layers(model)  # mlp / conv4 only
        if isinstance(model, MLP):
            hidden, head = [f"fc{i}" for i in range(model.n_layers - 1)], f"fc{model.n_layers - 1}"
        else:
            hidden, head = [f"conv{i}" for i in range(4)], "head"
        shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
        spec = cfg.get("embedding", "comparable")
        self.shapes = {n: shapes[f"{n}.weight"] for n in hidden}
        self.K = {n: embedding_size(spec, s[0]) for n, s in self.shapes.items()}
        self.emb = [f"{n}.weight" for n in hidden]
        self.head_layer = head
        self.head = [f"{head}.weight", f"{head}.bias"]
        self.adapt_head = bool(cfg.get("adapt_head", True))

    def prepare_phi(self, phi):
        out = dict(phi)
        for n in self.shapes:
            w = phi[f"{n}.weight"]
            out[f"{n}.weight"] = torch.full((self.K[n],), self.K[n] ** -0.5, dtype=w.dtype, device=w.device)
        return out

    def init_extra(self, phi):
        ref = phi[self.emb[0]]
        h = hashlib.sha256()
        for k in sorted(phi):
            h.update(phi[k].detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        g = torch.Generator().manual_seed(int.from_bytes(h.digest()[:8], "little") >> 1)
        extra = {}
        for n, shape in self.shapes.items():
            bound = math.prod(shape[1:]) ** -0.5
            t = (2 * torch.rand((self.K[n], *shape), generator=g, dtype=torch.float64) - 1) * bound
            extra[f"template.{n}"] = t.to(ref.device, ref.dtype)
        return extra

    def weight(self, params, extra, layer):
        """The layer's weight: generated from its embedding for hidden layers, phi's own for the head."""
        if layer in self.shapes:
            return torch.tensordot(params[f"{layer}.weight"], extra[f"template.{layer}"], dims=1)
        return params[f"{layer}.weight"]

    def forward(self, params, extra, x):
        model = self.learner.model
        if isinstance(model, MLP):
            x = x.flatten(1)
            for i in range(model.n_layers):
                x = F.linear(x, self.weight(params, extra, f"fc{i}"), params[f"fc{i}.bias"])
                if i < model.n_layers - 1:
                    x = model.act(x)
            return x
        stride = 2 if model.variant == "strided" else 1
        for i in range(4):
            x = F.conv2d(x, self.weight(params, extra, f"conv{i}"), params[f"conv{i}.bias"], stride, 1)
            x = F.relu(F.batch_norm(x, None, None, params[f"bn{i}.weight"], params[f"bn{i}.bias"], True, 0.0, 1e-5))
            if model.variant == "maxpool" and x.shape[-1] >= 2:
                x = F.max_pool2d(x, 2)
        return F.linear(x.flatten(1), params["head.weight"], params["head.bias"])

    def adapted(self, names):
        allowed = set(self.emb) | (set(self.head) if self.adapt_head else set())
        return [k for k in names if k in allowed]

    def metrics(self, extra):
        return {"template_norm": torch.stack([v.norm() for v in extra.values()]).mean()}


BASELINES = {"meta_sgd": MetaSGD, "tnet": TNet, "mtnet": MTNet, "hyper_representation": HyperRepresentation,
             "hypernet": HyperNet}
for _name, _cls in BASELINES.items():
    register(_name)(_cls)
