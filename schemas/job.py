"""The one job-configuration schema.

The API validates requests with it, the database stores the validated config verbatim
(``JobConfig.model_dump(mode="json")``), and the worker and ``core.MetaTrainer`` read that dict back.
Unknown fields are errors everywhere (``extra="forbid"``). Defaults are the paper's values where it
gives one (Chen, Friesen et al. 2020, App. D-E; Finn et al. 2017 for the sinusoid protocol).

One module per section (``schemas.algorithm``, ``model``, ``modules``, ``tasks``, ``optimisation``, ``execution``;
shared field types in ``schemas.types``); this module assembles them and re-exports every public name, so
``from schemas.job import X`` keeps working.
"""
from __future__ import annotations

from pydantic import Field, model_validator

from .algorithm import (Algorithm, BASELINE_ALGORITHMS, FOMAML, HyperNet, HyperRepresentation, IMAML,
    IMPLICIT_ALGORITHMS, MAML, MTNet, MetaSGD, Reptile, SIGMA_ALGORITHMS, SecondOrder, SigmaIMAML, SigmaMAML,
    SigmaReptile, TNet)
from .execution import Execution, Run
from .model import Conv4Model, IdentityModel, MLPModel, Model
from .modules import Modules
from .optimisation import Inner, Outer
from .tasks import (Augment, HierarchicalNormalTasks, IMAGE_FAMILIES, ImageClassesTasks, PolynomialTasks,
    RegressionDatasetTasks, RegressionSplit, SinusoidTasks, Split, Tasks)
from .types import CompileSwitch, DatasetId, FiniteFloat, Int, OptInt, PositiveFloat, Range, Strict


class JobConfig(Strict):
    algorithm: Algorithm
    model: Model
    tasks: Tasks
    modules: Modules = Field(default_factory=Modules)
    inner: Inner = Field(default_factory=Inner)
    outer: Outer = Field(default_factory=Outer)
    execution: Execution = Field(default_factory=Execution)
    run: Run = Field(default_factory=Run)
    seed: Int = Field(0, ge=0, le=2**63 - 1)

    @staticmethod
    def _converged_inner(name: str, image: bool) -> bool:
        """Whether the default inner loop is the one that reaches the MAP (20 proximal steps, lr 0.2 on images): the
        implicit family, whose meta-gradient is taken there. sigma_reptile on images keeps 5 steps at lr 0.4: at 20
        steps and lr 0.2, 600 meta-steps, two seeds gave 0.502 and 0.785 after 20 steps (Reptile 0.751 on the second;
        docs/results/implicit.md): one collapsed, so it is not the image default before a 3-seed comparison says so."""
        return name in IMPLICIT_ALGORITHMS and not (image and name == "sigma_reptile")

    @model_validator(mode="after")
    def _compat(self):
        if self.inner.optimizer is None:
            name = self.algorithm.name
            self.inner.optimizer = "proximal_gd" if (name in SIGMA_ALGORITHMS or name == "imaml") else "sgd"
        fam, arch = self.tasks.family, self.model.arch
        name = self.algorithm.name
        image = fam in IMAGE_FAMILIES
        if self.inner.lr is None:
            self.inner.lr = (0.2 if self._converged_inner(name, image) else 0.4) if image else 0.01
        if self.outer.lr_phi is None:
            self.outer.lr_phi = 1e-2 if name in ("reptile", "sigma_reptile") else 1e-3
        if self.inner.steps is None:  # Reptile needs more than one step; implicit gradients need the MAP
            self.inner.steps = (20 if self._converged_inner(name, image) else
                                1 if (image and name in ("maml", "fomaml", "sigma_maml")) else 5)
        if name in BASELINE_ALGORITHMS:
            if self.inner.optimizer != "sgd":
                raise ValueError(f"algorithm '{name}' uses plain gradient inner steps: inner.optimizer must be 'sgd'")
            if arch == "identity" and name != "meta_sgd":  # Meta-SGD's per-parameter rates need no layers
                raise ValueError(f"algorithm '{name}' needs model.arch 'mlp' or 'conv4'")
        if getattr(self.algorithm, "second_order", "unroll") == "hvp":
            if self.algorithm.first_order:
                raise ValueError("second_order 'hvp' cannot be combined with first_order")
            if self.inner.optimizer not in ("sgd", "proximal_gd"):
                raise ValueError("second_order 'hvp' needs inner.optimizer 'sgd' or 'proximal_gd'")
        if fam == "hierarchical_normal" and arch != "identity":
            raise ValueError("tasks.family 'hierarchical_normal' needs model.arch 'identity'")
        if arch == "identity" and fam != "hierarchical_normal":
            raise ValueError("model.arch 'identity' is only for tasks.family 'hierarchical_normal'")
        if arch == "conv4" and fam not in IMAGE_FAMILIES:
            raise ValueError(f"model.arch 'conv4' needs an image task family ({', '.join(IMAGE_FAMILIES)}); "
                             f"'{fam}' is not one")
        if self.execution.amp and (arch != "conv4" or self.execution.dtype != "float32"):
            raise ValueError("execution.amp (bfloat16 convolutions) needs model.arch 'conv4' and execution.dtype "
                             "'float32'")
        if self.execution.world_size > self.outer.meta_batch:
            raise ValueError(f"execution.world_size ({self.execution.world_size}) exceeds outer.meta_batch "
                             f"({self.outer.meta_batch}): every rank adapts at least one task of the meta-batch")
        return self


__all__ = [
    "Algorithm", "Augment", "BASELINE_ALGORITHMS", "CompileSwitch", "Conv4Model", "DatasetId", "Execution", "FOMAML",
    "FiniteFloat",
    "HierarchicalNormalTasks", "HyperNet", "HyperRepresentation", "IMAGE_FAMILIES", "IMAML", "IMPLICIT_ALGORITHMS",
    "IdentityModel", "ImageClassesTasks", "Inner", "Int", "JobConfig", "MAML", "MLPModel", "MTNet", "MetaSGD",
    "Model", "Modules", "OptInt", "Outer", "PolynomialTasks", "PositiveFloat", "Range", "RegressionDatasetTasks",
    "RegressionSplit", "Reptile", "Run", "SIGMA_ALGORITHMS", "SecondOrder", "SigmaIMAML", "SigmaMAML", "SigmaReptile",
    "SinusoidTasks", "Split", "Strict", "TNet", "Tasks",
]
