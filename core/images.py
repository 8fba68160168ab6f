"""N-way K-shot classification over an in-memory collection of image classes (``image_classes``).

The collection is a uint8 tensor ``[n_classes, n_per_class, H, W]`` (or ``[C, P, channels, H, W]``) where
255 maps to 1.0 and 0 to 0.0, plus one group id per class (an Omniglot alphabet is a group). Images are
resized once at construction (area averaging, 28x28 by default) and, with ``rotations``, every class gives
four classes (0/90/180/270 degrees). Omniglot arrays come in *inverted* (strokes 255, background 0) so that
strokes are 1.0 and the zero padding of augmentation is background.

Splits are made over the *original* classes (or over groups) with a fixed seed, before rotation, so a
rotated copy of a held-out character can never reach meta-training. All task sampling and augmentation
draws only from the ``torch.Generator`` passed to ``sample``.

Two task modes:

- ``random`` (few-shot protocol, App. E.4.1): each task picks ``ways`` classes of the split uniformly at
  random, then ``shots`` support and ``query`` query instances per class, all distinct.
- ``per_group`` (augmented protocol of App. E.1): each group of the split holds one fixed task of ``ways``
  classes (chosen once with the split seed); a task is a uniformly drawn group. With ``instance_split``,
  the first ``instance_split`` instances of every class (after a seeded shuffle) are task-train (support)
  instances and the rest task-validation (query) instances: 15 / 5 in the paper.

Labels are int64 ``0 .. ways-1``; which class gets which label is random per task.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch.nn import functional as F

from .family import Family, TaskBatch

SPLITS = ("train", "val", "test")


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return images.float()


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``[..., H, W]`` images to ``size x size`` (area averaging when shrinking, bilinear otherwise).

    uint8 stays uint8 (rounded), float stays float.
    """
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images.clone()
    lead = images.shape[:-2]
    x = to_float(images).reshape(-1, 1, h, w)
    if size <= min(h, w):
        y = F.interpolate(x, size=(size, size), mode="area")
    else:
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = y.reshape(*lead, size, size)
    if images.dtype == torch.uint8:
        return (y * 255.0).round().clamp(0, 255).to(torch.uint8)
    return y


def split_classes(groups: Sequence[int], by: str = "class", test_fraction: float = 0.2,
                  val_fraction: float = 0.0, seed: int = 0) -> dict:
    """Assign each class index to train / val / test with a fixed seed.

    ``by="class"``: the classes are shuffled and cut; ``by="group"``: the groups are, and every class follows
    its group. Each non-zero fraction gets at least one unit and train always keeps at least one.
    Returns ``{"train": LongTensor, "val": LongTensor, "test": LongTensor}`` of class indices (sorted).
    """
    groups = torch.as_tensor(list(groups), dtype=torch.long)
    n_classes = groups.numel()
    if by == "class":
        units = torch.arange(n_classes)
    elif by == "group":
        units = torch.unique(groups)
    else:
        raise ValueError(f"split.by must be 'class' or 'group', got {by!r}")
    n = units.numel()
    if not (0 <= test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError("split fractions must be in [0, 1) and sum to less than 1")

    def count(f):
        return 0 if f == 0 else max(1, int(round(f * n)))

    n_test, n_val = count(test_fraction), count(val_fraction)
    if n_test + n_val >= n:
        raise ValueError(f"cannot split {n} {by}(es) into train/val/test with fractions "
                         f"test={test_fraction}, val={val_fraction}: nothing would be left for training")
    g = torch.Generator().manual_seed(int(seed))
    perm = units[torch.randperm(n, generator=g)]
    parts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
    if by == "class":
        return {k: v.sort().values for k, v in parts.items()}
    return {k: torch.nonzero(torch.isin(groups, v)).flatten() for k, v in parts.items()}


def augment(x: torch.Tensor, generator: torch.Generator, scale=(0.8, 1.2), translate=(-0.2, 0.2),
            rotate: Optional[Sequence[float]] = None) -> torch.Tensor:
    """Random affine augmentation of float images ``[N, C, H, W]`` (App. E.1).

    Each image is scaled by s ~ U[scale], translated by (tx, ty) ~ U[translate] (fractions of the image
    width/height) and, with ``rotate=(lo, hi)`` degrees, rotated by an angle ~ U[lo, hi]. Pixels coming from
    outside the image are 0 (background of the inverted images). Randomness: ``generator`` only.
    """
    n = x.shape[0]
    if n == 0:
        return x
    u = torch.rand(n, 4, generator=generator, dtype=torch.float32)
    s = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    tx = translate[0] + (translate[1] - translate[0]) * u[:, 1]
    ty = translate[0] + (translate[1] - translate[0]) * u[:, 2]
    if rotate is not None:
        ang = math.radians(1.0) * (rotate[0] + (rotate[1] - rotate[0]) * u[:, 3])
    else:
        ang = torch.zeros(n)
    c, si = torch.cos(ang), torch.sin(ang)
    # affine_grid maps output coordinates to input coordinates: in = R(-a) (out - 2t) / s
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = c / s, si / s
    theta[:, 1, 0], theta[:, 1, 1] = -si / s, c / s
    t = torch.stack([-2 * tx, -2 * ty], -1)  # grid coordinates span 2 per image width
    theta[:, :, 2] = torch.einsum("nij,nj->ni", theta[:, :, :2], t)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class ImageClasses(Family):
    """N-way K-shot classification over image classes; see the module docstring."""

    kind = "classification"

    def __init__(self, images: torch.Tensor, groups: Optional[Sequence[int]] = None, ways: int = 5,
                 shots: int = 1, query: int = 15, image_size: Optional[int] = 28, rotations: bool = False,
                 split_by: str = "class", test_fraction: float = 0.2, val_fraction: float = 0.0,
                 split_seed: int = 0, task_mode: str = "random", instance_split: Optional[int] = None,
                 augment: Optional[dict] = None, class_names: Optional[Sequence[str]] = None):
        images = torch.as_tensor(images)
        if images.dim() == 4:
            images = images.unsqueeze(2)  # [C, P, 1, H, W]
        if images.dim() != 5:
            raise ValueError(f"images must be [classes, per_class, H, W] or [classes, per_class, channels, H, W], "
                             f"got shape {tuple(images.shape)}")
        n_classes, n_per_class = images.shape[:2]
        if image_size is not None:
            images = resize(images, int(image_size))
        self.images = images if images.dtype == torch.uint8 else images.float()  # [C, P, ch, H, W]
        self.n_base_classes, self.n_per_class = int(n_classes), int(n_per_class)
        self.groups = torch.as_tensor(list(groups) if groups is not None else [0] * n_classes, dtype=torch.long)
        if self.groups.numel() != n_classes:
            raise ValueError(f"{self.groups.numel()} group ids for {n_classes} classes")
        self.class_names = list(class_names) if class_names is not None else None
        self.ways, self.shots, self.query = int(ways), int(shots), int(query)
        self.rotations = bool(rotations)
        self.n_rot = 4 if self.rotations else 1
        self.task_mode = task_mode
        self.instance_split = instance_split
        self.augment_cfg = dict(augment) if augment else None
        self.input_shape = tuple(self.images.shape[2:])
        self.output_dim = self.ways
        self.splits = split_classes(self.groups.tolist(), split_by, test_fraction, val_fraction, split_seed)
        self.split_seed = int(split_seed)
        if self.ways < 1 or self.shots < 1 or self.query < 0:
            raise ValueError("ways and shots must be >= 1 and query >= 0")
        g = torch.Generator().manual_seed(self.split_seed + 1)
        if instance_split is not None:
            if not 1 <= instance_split < n_per_class:
                raise ValueError(f"instance_split must be in [1, {n_per_class - 1}], got {instance_split}")
            if self.shots > instance_split or self.query > n_per_class - instance_split:
                raise ValueError(f"shots={self.shots} / query={self.query} do not fit the instance split "
                                 f"{instance_split} / {n_per_class - instance_split}")
            self.instance_perm = torch.randperm(n_per_class, generator=g)
        elif self.shots + self.query > n_per_class:
            raise ValueError(f"shots + query = {self.shots + self.query} exceeds the {n_per_class} images per class")
        if task_mode == "random":
            for s, cls in self.splits.items():
                if 0 < cls.numel() * self.n_rot < self.ways:
                    raise ValueError(f"split {s!r} has {cls.numel() * self.n_rot} classes, fewer than ways={self.ways}")
        elif task_mode == "per_group":
            self.group_tasks = {}
            for s, cls in self.splits.items():
                tasks = []
                for grp in torch.unique(self.groups[cls]).tolist():
                    members = cls[self.groups[cls] == grp]
                    pool = (members.repeat_interleave(self.n_rot) * self.n_rot
                            + torch.arange(self.n_rot).repeat(members.numel()))
                    if pool.numel() < self.ways:
                        continue  # groups with fewer than `ways` classes hold no task (as in Flennerhag et al.)
                    tasks.append(pool[torch.randperm(pool.numel(), generator=g)[:self.ways]].sort().values)
                self.group_tasks[s] = torch.stack(tasks) if tasks else torch.zeros(0, self.ways, dtype=torch.long)
        else:
            raise ValueError(f"task_mode must be 'random' or 'per_group', got {task_mode!r}")

    # ------------------------------------------------------------------ introspection
    def classes(self, split: str = "train") -> torch.Tensor:
        """Original (unrotated) class indices of a split."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.splits[split]

    def summary(self) -> dict:
        return {"classes": self.n_base_classes, "per_class": self.n_per_class, "rotations": self.rotations,
                "input_shape": list(self.input_shape),
                **{f"{s}_classes": int(self.splits[s].numel()) for s in SPLITS},
                **{f"{s}_groups": int(torch.unique(self.groups[self.splits[s]]).numel()) for s in SPLITS}}

    def loss(self, pred, y):
        return F.cross_entropy(pred, y)

    # ------------------------------------------------------------------ sampling
    def _gather(self, cls: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
        """cls: [...] rotated class ids (base * n_rot + r); inst: [..., k] instance ids -> float [..., k, ch, H, W]."""
        base, rot = cls // self.n_rot, cls % self.n_rot
        x = to_float(self.images[base.unsqueeze(-1), inst])  # [..., k, ch, H, W]
        if self.n_rot > 1:
            out = x.clone()
            for r in range(1, 4):
                m = rot == r
                if m.any():
                    out[m] = torch.rot90(x[m], r, dims=(-2, -1))
            x = out
        return x

    def sample(self, n: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        pool = self.classes(split)
        if pool.numel() == 0:
            raise ValueError(f"split {split!r} is empty; set a non-zero fraction for it")
        ways, k, q = self.ways, self.shots, self.query
        if self.task_mode == "random":
            rotated = (pool.repeat_interleave(self.n_rot) * self.n_rot + torch.arange(self.n_rot).repeat(pool.numel()))
            pick = torch.rand(n, rotated.numel(), generator=generator).argsort(-1)[:, :ways]
            cls = rotated[pick]                                            # [n, ways]; label = position
        else:
            tasks = self.group_tasks[split]
            if tasks.shape[0] == 0:
                raise ValueError(f"no group of split {split!r} has {ways} classes")
            t = torch.randint(tasks.shape[0], (n,), generator=generator)
            cls = tasks[t]
            cls = cls.gather(1, torch.rand(n, ways, generator=generator).argsort(-1))  # shuffle labels
        P = self.n_per_class
        if self.instance_split is None:
            inst = torch.rand(n, ways, P, generator=generator).argsort(-1)[..., :k + q]
            inst_s, inst_q = inst[..., :k], inst[..., k:]
        else:
            a = self.instance_split
            tr, va = self.instance_perm[:a], self.instance_perm[a:]
            inst_s = tr[torch.rand(n, ways, a, generator=generator).argsort(-1)[..., :k]]
            inst_q = va[torch.rand(n, ways, P - a, generator=generator).argsort(-1)[..., :q]]
        xs = self._gather(cls, inst_s).reshape(n, ways * k, *self.input_shape)
        xq = self._gather(cls, inst_q).reshape(n, ways * q, *self.input_shape)
        labels = torch.arange(ways, dtype=torch.long)
        ys = labels.repeat_interleave(k).expand(n, -1).clone()
        yq = labels.repeat_interleave(q).expand(n, -1).clone()
        aug = self.augment_cfg
        if aug and split in aug.get("splits", ("train",)):
            kw = dict(scale=tuple(aug.get("scale", (0.8, 1.2))), translate=tuple(aug.get("translate", (-0.2, 0.2))),
                      rotate=tuple(aug["rotate"]) if aug.get("rotate") else None)
            xs = augment(xs.reshape(-1, *self.input_shape), generator, **kw).reshape(xs.shape)
            xq = augment(xq.reshape(-1, *self.input_shape), generator, **kw).reshape(xq.shape)
        return TaskBatch(xs, ys, xq, yq)
