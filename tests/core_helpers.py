"""Small builders shared by the core tests: tiny models and families in float64."""
import torch

from core.algorithms import Learner, build_algorithm
from core.models import MLP, Conv4, init_params
from core.modules import build_partition
from core.optim import build_optimizer
from core.tasks import Family, TaskBatch



class ToyRegression(Family):
    kind = "regression"
    input_shape = (2,)
    output_dim = 1

    def sample(self, n, g, split="train"):
        x = torch.randn(n, 14, 2, generator=g, dtype=torch.float64)
        w = torch.randn(n, 1, 2, generator=g, dtype=torch.float64)
        y = torch.sin((x * w).sum(-1, keepdim=True))
        return TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])


class ToyImages(Family):
    kind = "classification"
    input_shape = (1, 8, 8)
    output_dim = 3

    def loss(self, pred, y):
        return torch.nn.functional.cross_entropy(pred, y)

    def sample(self, n, g, split="train"):
        x = torch.rand(n, 12, 1, 8, 8, generator=g, dtype=torch.float64)
        y = torch.arange(3).repeat(4).expand(n, 12).clone()
        return TaskBatch(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:])


def make(arch="mlp", algorithm=None, inner="proximal_gd", lr=0.1, steps=2, partition="per_layer", seed=0,
         hidden=(5,), activation="tanh"):
    algorithm = algorithm or {"name": "sigma_maml", "first_order": False, "init_sigma2": 1.0, "ig_beta": 0.0}
    family = ToyRegression() if arch == "mlp" else ToyImages()
    model = MLP(2, 1, hidden, activation) if arch == "mlp" else Conv4((1, 8, 8), 3, channels=3)
    g = torch.Generator().manual_seed(seed)
    phi = init_params(model, g, torch.float64)
    part = build_partition(phi, partition)
    learner = Learner(model, family, part, build_optimizer(inner, lr), steps)
    alg = build_algorithm(algorithm, learner)
    ls = alg.init_log_sigma2(len(part.names), torch.float64, "cpu")
    # distinct sigma^2 per module so module-level bugs show
    if alg.learns_sigma:
        ls = ls + 0.3 * torch.arange(len(part.names), dtype=torch.float64) - 0.5
    meta = {"phi": phi, "log_sigma2": ls}
    batch = family.sample(3, g)
    return alg, learner, meta, batch


def tree_dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


def random_like(meta, g):
    return {"phi": {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in meta["phi"].items()},
            "log_sigma2": torch.randn(meta["log_sigma2"].shape, generator=g, dtype=torch.float64)}


def add(meta, d, eps):
    return {"phi": {k: v + eps * d["phi"][k] for k, v in meta["phi"].items()},
            "log_sigma2": meta["log_sigma2"] + eps * d["log_sigma2"]}


def flat(d: dict):
    return torch.cat([v.reshape(-1) for v in d.values()])


def unflat(vec, like: dict):
    out, i = {}, 0
    for k, v in like.items():
        out[k] = vec[i:i + v.numel()].view_as(v)
        i += v.numel()
    return out


def fd(J, meta, d, eps=1e-6):
    """Directional derivative of J at meta along d: fourth-order central finite difference."""
    return (-J(add(meta, d, 2 * eps)) + 8 * J(add(meta, d, eps)) - 8 * J(add(meta, d, -eps))
            + J(add(meta, d, -2 * eps))) / (12 * eps)


def png(a, mode=None) -> bytes:
    """A uint8 array as the bytes of a PNG file."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format="PNG")
    return buf.getvalue()


def light_strokes(rng, side=12, background=250):
    """Dark random strokes on a light background (so that an upload inverts it) with grey levels in between."""
    import numpy as np
    a = np.full((side, side), background, dtype=np.uint8)
    for _ in range(3):
        r, c = rng.integers(0, side, 2)
        a[r, :] = rng.integers(0, 120)
        a[:, c] = rng.integers(30, 200)
    return a
