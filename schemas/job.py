"""The one job-configuration schema.

The API validates requests with it, the database stores the validated config verbatim
(``JobConfig.model_dump(mode="json")``), and the worker and ``core.MetaTrainer`` read that dict back.
Unknown fields are errors everywhere (``extra="forbid"``). Defaults are the paper's values where it
gives one (Chen, Friesen et al. 2020, App. D-E; Finn et al. 2017 for the sinusoid protocol).
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, PlainValidator, Tag, WithJsonSchema,
                      model_validator)

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]



def _json_integer(v):
    """JSON Schema's ``integer`` admits 3.0; the API validates bodies in strict mode (``api.bodies``: no "3" or
    true for 3), so an integral float becomes an int before the strict check."""
    return int(v) if type(v) is float and v.is_integer() else v


def _json_array(v):
    """A JSON array for a fixed-length tuple (strict mode takes only a tuple from Python)."""
    return tuple(v) if isinstance(v, list) else v


def _compile_switch(v):
    """execution.compile: exactly true, false or "auto" (no 1 or "true", in strict mode or not)."""
    if v is True or v is False or v == "auto":
        return v
    raise ValueError('must be true, false or "auto"')


CompileSwitch = Annotated[Union[bool, Literal["auto"]], PlainValidator(_compile_switch),
                          WithJsonSchema({"anyOf": [{"type": "boolean"}, {"type": "string", "enum": ["auto"]}]})]

Int = Annotated[int, BeforeValidator(_json_integer)]
OptInt = Annotated[Optional[int], BeforeValidator(_json_integer)]  # (Optional[Int] loses its bounds in the document)

SIGMA_ALGORITHMS = ("sigma_maml", "sigma_imaml", "sigma_reptile")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --------------------------------------------------------------------------- algorithms
class _Shrinkage(Strict):
    init_sigma2: PositiveFloat = Field(
        1.0, description="initial sigma^2 of every module (clipped to [1e-5, 1e5]), on Eq. 4's scale: the prior's "
        "precision on a loss averaged over n examples is 1 / (n sigma^2) (Family.prior_weight). With 1.0 a proximal "
        "step at the default inner learning rates keeps 1 / (1 + lr / (n sigma^2)) of the move (0.999 on sinusoid, "
        "0.93 on 5-way 1-shot Omniglot at lr 0.4, 0.96 at the implicit family's 0.2), so a sigma variant starts in its special case's regime and learns how much "
        "to shrink; measured in docs/results/sinusoid.md and docs/results/omniglot_5way.md")
    ig_beta: float = Field(
        1e-5, ge=0, allow_inf_nan=False,
        description="scale beta of the inverse-Gamma(1, beta) regulariser on sigma^2 (App. D.2, Eq. 49); 0 disables it",
    )


SecondOrder = Literal["unroll", "hvp"]
_SECOND_ORDER = Field(
    "unroll", description="unroll: autograd through the whole inner loop; hvp: keep only the parameter "
                          "trajectory and accumulate the meta-gradient backwards with Hessian-vector products "
                          "(same value, memory of one inner step's graph; inner optimizer sgd or proximal_gd)")


class SigmaMAML(_Shrinkage):
    name: Literal["sigma_maml"]
    first_order: bool = False
    second_order: SecondOrder = _SECOND_ORDER


class MAML(Strict):
    name: Literal["maml"]
    first_order: bool = False
    second_order: SecondOrder = _SECOND_ORDER


class FOMAML(Strict):
    name: Literal["fomaml"]


class _Implicit(Strict):
    cg_steps: Int = Field(5, ge=1, le=100, description="conjugate-gradient iterations (App. D.1: 5)")


_DAMPING_SCALE = ("on Eq. 4's scale: the algorithm multiplies it by the family's prior weight w (1 / n for a loss "
                  "averaged over n support examples), as it does Sigma^-1")


class SigmaIMAML(_Shrinkage, _Implicit):
    name: Literal["sigma_imaml"]
    damping: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="d-tilde of Eq. 48, " + _DAMPING_SCALE + ". Default 1.0: with init_sigma2 1 the pair starts "
        "exactly where imaml's defaults are (d-tilde = d * lambda, App. D.2). Without damping, CG on a Hessian "
        "with negative eigenvalues below -lambda returns a meta-gradient larger than the one it solves for "
        "(docs/results/implicit.md)")


class IMAML(_Implicit):
    name: Literal["imaml"]
    lam: PositiveFloat = Field(1.0, description="L2 regularisation scale lambda = 1/sigma^2 (fixed), on Eq. 4's "
                               "scale like sigma^2: the precision on a loss averaged over n examples is lambda / n "
                               "(the paper's best Omniglot value 0.025, App. E.4.3, is on its own loss scale)")
    damping: float = Field(
        1.0, ge=0, allow_inf_nan=False,
        description="d of Eq. 47 ((1 + d) I + H / lambda; Table 8's Omniglot value 1.0). With 0, 5-way 1-shot "
        "Omniglot meta-training collapsed: the Hessian at theta_K had eigenvalues down to -4 against lambda / n = "
        "0.2, CG's residual grew above the right-hand side, and test accuracy peaked near 0.6 "
        "(docs/results/implicit.md)")


class SigmaReptile(_Shrinkage, _Implicit):
    name: Literal["sigma_reptile"]
    cg_steps: Int = Field(1, ge=1, le=100, description="CG iterations for the sigma^2 gradient (Table 7: 1)")
    damping: float = Field(0.5, ge=0, allow_inf_nan=False,
                           description="d-tilde of Eq. 48 (Table 7: 0.5), " + _DAMPING_SCALE)
    phi_data: Literal["task", "support"] = Field(
        "task", description="the data phi's MAP (Eq. 9) is fitted on. 'support': the paper's D^train exactly (App. "
        "A's closed forms hold for it). 'task' (default): support and query together, the data Reptile adapts on; "
        "sigma^2 still gets the implicit gradient of the query loss at theta fitted on the support. With 1-shot "
        "supports 'support' starves phi of data: Omniglot 5-way 1-shot, 2,000 meta-steps, test accuracy after 10 "
        "steps 0.834 ('task') vs 0.406 ('support') vs Reptile 0.841; sinusoid with the defaults, MSE after 100 "
        "steps 0.148 ('task') vs 0.184 ('support') vs Reptile 0.149 (docs/results/omniglot_5way.md and "
        "sinusoid.md; the 'support' figures are those files at commit 5580d4e, same scripts)")


class Reptile(Strict):
    name: Literal["reptile"]


# The comparison algorithms (core/baselines.py): plain gradient inner steps (inner.optimizer 'sgd'), their
# extra meta-learned tensors use outer.lr_extra; model.arch mlp or conv4.
class MetaSGD(Strict):
    name: Literal["meta_sgd"]
    granularity: Literal["parameter", "module"] = Field(
        "parameter", description="one learned learning rate per parameter entry, or one per module of the partition")
    init_lr: Optional[PositiveFloat] = Field(None, description="initial learning rates; None = inner.lr")


class TNet(Strict):
    name: Literal["tnet"]


class MTNet(Strict):
    name: Literal["mtnet"]
    temperature: PositiveFloat = Field(1.0, description="Gumbel-softmax temperature of the row masks (Eq. 11)")
    init_zeta: FiniteFloat = Field(0.0, description="initial mask logits zeta (0: each row updated with p = 1/2)")


class HyperRepresentation(Strict):
    name: Literal["hyper_representation"]
    init_eta: Optional[PositiveFloat] = Field(None, description="initial ground-model step size eta; None = inner.lr")


class HyperNet(Strict):
    """MH (meta-learning via hypernetworks): hidden-layer weights W_l = sum_k e_{l,k} Template_{l,k}; the inner
    loop adapts the task embeddings e_l (and the head), the outer loop learns the templates (outer.lr_extra)."""
    name: Literal["hypernet"]
    embedding: Union[Literal["compressed", "comparable", "overparametrised"],
                     Annotated[int, Field(ge=1, le=4096), BeforeValidator(_json_integer)]] = Field(
        "comparable", description="task-embedding size K per hidden layer, relative to the layer's width (output "
        "units / channels): 'compressed' width/4, 'comparable' width, 'overparametrised' 2 x width; or an explicit K")
    adapt_head: bool = Field(True, description="the inner loop adapts the output layer as well as the embeddings "
                             "(needed for the frozen-features evaluation, which adapts only the head)")


BASELINE_ALGORITHMS = ("meta_sgd", "tnet", "mtnet", "hyper_representation", "hypernet")

Algorithm = Annotated[
    Union[SigmaMAML, MAML, FOMAML, SigmaIMAML, IMAML, SigmaReptile, Reptile, MetaSGD, TNet, MTNet,
          HyperRepresentation, HyperNet], Field(discriminator="name")
]


# --------------------------------------------------------------------------- models
class MLPModel(Strict):
    arch: Literal["mlp"]
    hidden: list[Annotated[int, Field(ge=1, le=4096), BeforeValidator(_json_integer)]] = Field(default_factory=lambda: [40, 40], max_length=16)
    activation: Literal["relu", "tanh", "gelu", "sigmoid"] = "relu"


class Conv4Model(Strict):
    arch: Literal["conv4"]
    channels: Int = Field(64, ge=1, le=512)
    variant: Literal["strided", "maxpool"] = Field(
        "strided", description="strided: 3x3 conv stride 2 (few-shot, Finn et al.); maxpool: stride 1 + 2x2 max-pool (App. E.1)"
    )
    channels_last: bool = Field(
        True, description="convolutions on channels-last (NHWC) memory: a faster conv4 MAML per-task loop on CPU "
                          "(benchmarks/core_bench.py, conv4 rows); the same function either way")


class IdentityModel(Strict):
    arch: Literal["identity"]


Model = Annotated[Union[MLPModel, Conv4Model, IdentityModel], Field(discriminator="arch")]


# --------------------------------------------------------------------------- modules
class Modules(Strict):
    partition: Literal["per_layer", "per_tensor", "groups"] = "per_layer"
    groups: Optional[dict[str, list[str]]] = Field(
        None, description="module name -> fnmatch patterns over parameter names (partition='groups')"
    )
    selection: Literal["gap", "threshold", "topk"] = Field(
        "gap", description="Sec. 4.3 task-specific module selection. gap: the modules above the largest gap in "
        "log sigma^2, only when that gap is at least min_gap (sigma^2 separated); otherwise every module is "
        "task-specific and adapts under its learned prior (what the paper scores few-shot accuracy with)")
    min_gap: float = Field(
        math.log(100.0), ge=0, allow_inf_nan=False,
        description="selection 'gap': the smallest gap in natural-log sigma^2 that counts as a separation "
                    "(default ln 100, Sec. 4.3's 'at least two orders of magnitude')")
    threshold: PositiveFloat = Field(1e-3, description="selection 'threshold': sigma^2 above this value")
    k: Int = Field(1, ge=1, description="selection 'topk': the k largest sigma^2")

    @model_validator(mode="after")
    def _groups(self):
        if self.partition == "groups" and not self.groups:
            raise ValueError("partition 'groups' needs a non-empty 'groups' mapping")
        if self.partition != "groups" and self.groups:
            raise ValueError("'groups' is only used with partition 'groups'")
        return self


# --------------------------------------------------------------------------- tasks
Range = Annotated[tuple[FiniteFloat, FiniteFloat], BeforeValidator(_json_array)]


def _check_range(name: str, r: Optional[Range]):
    if r is not None and not r[0] <= r[1]:
        raise ValueError(f"{name}: lower bound {r[0]} is above upper bound {r[1]}")


class SinusoidTasks(Strict):
    family: Literal["sinusoid"]
    shots: Int = Field(10, ge=1, le=10000)
    query: Int = Field(10, ge=1, le=10000)
    amplitude: Range = (0.1, 5.0)
    phase: Range = (0.0, math.pi)
    x_range: Range = (-5.0, 5.0)
    frequency: Optional[Range] = Field(None, description="MT-net Sec. 6.1 uses (0.8, 1.2); None = frequency 1")

    @model_validator(mode="after")
    def _ranges(self):
        for n in ("amplitude", "phase", "x_range", "frequency"):
            _check_range(n, getattr(self, n))
        return self


class HierarchicalNormalTasks(Strict):
    family: Literal["hierarchical_normal"]
    variant: Literal["univariate", "linear", "swirl"] = Field(
        "univariate", description="univariate: App. A; linear: App. C.1; swirl: App. C.2"
    )
    shots: Int = Field(10, ge=1, le=100000, description="N training observations per task")
    query: Int = Field(10, ge=1, le=100000, description="K validation observations per task")
    phi_true: FiniteFloat = Field(0.0, description="univariate only: true prior mean")
    sigma2_true: PositiveFloat = Field(1.0, description="univariate only: true prior variance")
    n_tasks: OptInt = Field(
        None, ge=1, le=1_000_000, description="a fixed set of T training tasks (App. A); None = a fresh task every draw"
    )


class PolynomialTasks(Strict):
    family: Literal["polynomial"]
    order: Int = Field(3, ge=0, le=20, description="MT-net Sec. 6.3 uses orders 0..3")
    shots: Int = Field(10, ge=1, le=10000)
    query: Int = Field(10, ge=1, le=10000)
    coefficients: Range = Field((-1.0, 1.0), description="each c_i ~ U[coefficients]")
    x_range: Range = Field((-5.0, 5.0), description="x ~ U[x_range] (MT-net Sec. 6.1's input range)")

    @model_validator(mode="after")
    def _ranges(self):
        for n in ("coefficients", "x_range"):
            _check_range(n, getattr(self, n))
        return self


class Split(Strict):
    by: Literal["class", "group"] = Field("class", description="split classes, or whole groups (alphabets)")
    test_fraction: float = Field(0.2, ge=0, lt=1, allow_inf_nan=False)
    val_fraction: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False, description="meta-validation split")
    seed: Int = Field(0, ge=0, le=2**63 - 1, description="fixed seed of the split (independent of the job seed)")

    @model_validator(mode="after")
    def _sum(self):
        if self.test_fraction + self.val_fraction >= 1:
            raise ValueError("test_fraction + val_fraction must be below 1")
        return self


class Augment(Strict):
    scale: Range = Field((0.8, 1.2), description="scale factor ~ U[scale] (App. E.1)")
    translate: Range = Field((-0.2, 0.2), description="translation ~ U[translate], fraction of the image size")
    rotate: Optional[Range] = Field(None, description="rotation in degrees ~ U[rotate]; E.1 large-data: (0, 360)")
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train"],
                                                          description="splits whose tasks are augmented")

    @model_validator(mode="after")
    def _ranges(self):
        for n in ("scale", "translate", "rotate"):
            _check_range(n, getattr(self, n))
        if self.scale[0] <= 0:
            raise ValueError("scale must be positive")
        return self


DatasetId = Annotated[str, Field(min_length=1, max_length=200)]


class ImageClassesTasks(Strict):
    """N-way K-shot classification. ``source: "omniglot"`` reads the Omniglot zips from the server's
    configured folder (METASHRINK_OMNIGLOT_DIR); ``source: "dataset"`` uses uploaded dataset id(s).
    ``{"dataset_id": ..., "ways": ...}`` without family/source means an uploaded image dataset."""

    # the document says what the discriminator (_task_family) does: family, or else dataset_id with ways
    model_config = ConfigDict(json_schema_extra={"anyOf": [{"required": ["family"]},
                                                           {"required": ["dataset_id", "ways"]}]})
    family: Literal["image_classes"] = "image_classes"
    source: Literal["omniglot", "dataset"] = "omniglot"
    dataset_id: Optional[Union[DatasetId, Annotated[list[DatasetId], Field(min_length=1, max_length=16)]]] = None
    ways: Int = Field(5, ge=2, le=1000)
    shots: Int = Field(1, ge=1, le=1000, description="support images per class")
    query: Int = Field(15, ge=1, le=1000, description="query images per class")
    image_size: OptInt = Field(28, ge=4, le=512, description="resize to image_size^2; None keeps the size")
    rotations: bool = Field(False, description="0/90/180/270 degree rotations as new classes (App. E.4.1)")
    split: Split = Field(default_factory=Split)
    task_mode: Literal["random", "per_group"] = Field(
        "random", description="random: any `ways` classes of the split; per_group: one fixed task per group (App. E.1)")
    instance_split: OptInt = Field(
        None, ge=1, le=10000, description="support from the first n instances per class, query from the rest (E.1: 15)")
    augment: Optional[Augment] = Field(None, description="on-the-fly augmentation (App. E.1)")

    @model_validator(mode="before")
    @classmethod
    def _dataset_source(cls, v):
        if isinstance(v, dict) and v.get("dataset_id") and "source" not in v:
            v = {**v, "source": "dataset"}
        return v

    @model_validator(mode="after")
    def _source(self):
        if self.source == "dataset" and not self.dataset_id:
            raise ValueError("source 'dataset' needs dataset_id")
        if self.source != "dataset" and self.dataset_id:
            raise ValueError("dataset_id is only used with source 'dataset'")
        if self.instance_split is not None and self.shots > self.instance_split:
            raise ValueError(f"shots={self.shots} exceeds instance_split={self.instance_split}")
        return self


class RegressionSplit(Strict):
    test_fraction: float = Field(0.2, ge=0, lt=1, allow_inf_nan=False)
    val_fraction: float = Field(0.0, ge=0, lt=1, allow_inf_nan=False)
    seed: Int = Field(0, ge=0, le=2**63 - 1)


class RegressionDatasetTasks(Strict):
    """Regression tasks from uploaded point sets (a task column/array), split by task with a fixed seed."""

    family: Literal["regression_dataset"] = "regression_dataset"
    source: Literal["dataset"] = "dataset"
    dataset_id: Union[DatasetId, Annotated[list[DatasetId], Field(min_length=1, max_length=16)]]
    shots: Int = Field(10, ge=1, le=100000)
    query: Int = Field(10, ge=1, le=100000)
    split: RegressionSplit = Field(default_factory=RegressionSplit)


IMAGE_FAMILIES = ("image_classes",)

def _task_family(v):
    """The discriminator; a config naming only ``dataset_id`` (the issue's upload contract) is an
    ``image_classes`` job when it has ``ways``, else a ``regression_dataset`` job."""
    if isinstance(v, dict):
        fam = v.get("family")
        if fam is None and "dataset_id" in v:
            return "image_classes" if "ways" in v else "regression_dataset"
        return fam
    return getattr(v, "family", None)


Tasks = Annotated[
    Union[Annotated[SinusoidTasks, Tag("sinusoid")], Annotated[PolynomialTasks, Tag("polynomial")],
          Annotated[HierarchicalNormalTasks, Tag("hierarchical_normal")],
          Annotated[ImageClassesTasks, Tag("image_classes")],
          Annotated[RegressionDatasetTasks, Tag("regression_dataset")]],
    Discriminator(_task_family, custom_error_type="invalid_family",
                  custom_error_message="tasks.family must be one of sinusoid, polynomial, hierarchical_normal, "
                                       "image_classes, regression_dataset"),
]


# --------------------------------------------------------------------------- optimisation
IMPLICIT_ALGORITHMS = ("imaml", "sigma_imaml", "sigma_reptile")  # meta-gradient taken at the inner loop's MAP


class Inner(Strict):
    optimizer: Optional[Literal["sgd", "adam", "proximal_gd", "proximal_adam"]] = Field(
        None, description="default: proximal_gd for the sigma algorithms and imaml, sgd otherwise"
    )
    lr: Optional[PositiveFloat] = Field(
        None, description="default by task family: for image_classes 0.4 (Finn et al.'s Omniglot step size; "
        "docs/results/omniglot_5way.md), except 0.2 for imaml, sigma_imaml and sigma_reptile, whose inner loop must "
        "converge (Table 8: iMAML 0.23; at 0.4 the step exceeds 2 / the largest Hessian eigenvalue, 4-10 on 5-way "
        "1-shot, and the loop oscillates: docs/results/implicit.md); 0.01 otherwise (Finn et al.'s sinusoid step "
        "size; docs/results/sinusoid.md)")
    steps: OptInt = Field(
        None, ge=1, le=10000, description="inner steps during meta-training; default 5, except 1 for the MAML "
        "family (maml, fomaml, sigma_maml) on image_classes (Finn et al.'s 5-way 1-shot Omniglot) and 20 for "
        "imaml, sigma_imaml and sigma_reptile: their meta-gradient (Eq. 7, Eq. 10's sigma^2 part) is the "
        "derivative at the MAP of the inner objective, so the inner loop must reach it (Table 8: iMAML 19 steps). "
        "The job metric 'stationarity' (the gradient norm of the inner objective at theta_K over its norm at phi) "
        "says how close it came; docs/results/implicit.md")
    betas: Annotated[tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]],
                     BeforeValidator(_json_array)] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8


class Outer(Strict):
    optimizer: Literal["adam", "sgd"] = "adam"
    meta_batch: Int = Field(25, ge=1, le=4096, description="tasks per meta-step (Finn et al.'s sinusoid value)")
    steps: Int = Field(1000, ge=1, le=10_000_000)
    lr_phi: Optional[PositiveFloat] = Field(
        None, description="outer learning rate of phi. Default 1e-3 (Finn et al.'s Adam rate for sinusoid and "
        "Omniglot), except 1e-2 for reptile and sigma_reptile: their meta-update is a parameter difference, not a "
        "gradient, and the paper gives that family its own, larger outer rates (Table 7: sigma-Reptile 5.7e-3 vs "
        "sigma-MAML 9.8e-4; Table 8: SGD 1.6-1.8). docs/results/sinusoid.md's tuning grid has both Reptile "
        "variants improving most from 1e-3 to 3e-3 (its largest point); its defaults table and "
        "docs/results/omniglot_5way.md show the results at 1e-2")
    lr_log_sigma2: PositiveFloat = Field(
        1e-3, description="outer learning rate of log sigma^2 (sigma algorithms only); equal to lr_phi's default, "
        "measured with it in docs/results/")
    lr_extra: Optional[PositiveFloat] = Field(
        None, description="outer learning rate of an algorithm's own meta-learned tensors (Meta-SGD's learning "
                          "rates, T-net's T, MT-net's zeta, hyper-representation's eta); None = lr_phi")
    schedule: Literal["constant", "linear"] = Field("constant", description="linear: decay to 0 at the last step")
    clip_grad_norm: Optional[PositiveFloat] = Field(
        None, description="clip the global norm of the meta-gradient (phi, log sigma^2 and the algorithm's own "
                          "tensors together) to this value before the outer optimizer; None = no clipping. "
                          "The norm before clipping is recorded as the grad_norm metric; the inverse-Gamma "
                          "penalty's gradient is added after clipping")


class Execution(Strict):
    vectorize: Literal["auto", "vmap", "loop"] = Field(
        "auto", description="adapt the tasks of a meta-batch with torch.func.vmap or a per-task loop (on CPU its "
        "tasks run on parallel threads, one per CPU of the worker: METASHRINK_TASK_THREADS); auto measures both on "
        "the first step"
    )
    compile: CompileSwitch = Field(
        "auto", description="torch.compile the meta-step (vmap: the whole meta-step; loop: one task's update). "
        "\"auto\": time a few eager steps, compile only when the eager time left in the job repays the expected "
        "compile time (25-70 s cold on 2 CPU cores; seconds when this worker's compile cache holds the job's "
        "shape), and keep the compiled step only if it is faster; the decision and the compile time are reported "
        "with the job (startup) and kept by its checkpoints")
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = Field(
        False, description="mixed precision for conv nets (model.arch conv4, dtype float32): the convolutions run "
        "under bfloat16 autocast on the job's device, in training and in every adapt of the published model; "
        "batch-norm, the head, the losses, the inner and outer updates and the stored parameters stay float32. "
        "Off by default; a speed option for GPUs with bf16 tensor cores (on CPUs it is usually slower)")
    world_size: Int = Field(
        1, ge=1, le=1024, description="ranks (processes) that train this one job with torch.distributed: the worker "
        "that claims it launches them (gloo on CPU, NCCL on GPUs, one GPU per rank); each rank adapts a disjoint "
        "share of the same meta-batch a world_size 1 job draws for the seed, and the finite tasks' update sums and "
        "counts are all-reduced, so the result equals world_size 1 up to float reduction order. At most "
        "outer.meta_batch, and at most the workers' METASHRINK_MAX_WORLD_SIZE per node (422 above it)")
    nodes: Int = Field(
        1, ge=1, le=1024, description="machines the world_size ranks are spread over (world_size / nodes each): the "
        "claiming worker is node 0 and hosts the rendezvous, join workers (queue 'join') on other machines start "
        "the other nodes' ranks. More than 1 only where the deployment allows it (METASHRINK_MAX_NODES, default 1: "
        "422 above it)")

    @model_validator(mode="after")
    def _ranks(self):
        if self.world_size % self.nodes:
            raise ValueError(f"execution.world_size ({self.world_size}) must be a multiple of execution.nodes "
                             f"({self.nodes}): every node runs world_size / nodes ranks")
        return self


class Run(Strict):
    """When the worker writes progress. With ``validate_every`` the job also holds out the family's ``val`` split
    (early stopping, as the papers do): every ``validate_every`` meta-steps and at the last one the current
    meta-model is adapted on ``validation_tasks`` validation tasks (the same tasks each time, from a generator
    of its own seeded from the job seed, so the training RNG stream is untouched and resume stays bit for bit)
    for ``validation_steps`` inner steps; the query metric is recorded as the series ``val_mse`` /
    ``val_accuracy`` / ``val_loss``, a checkpoint is written at each validation, the best one (lowest loss,
    highest accuracy) is marked, training stops after ``patience`` validations without improvement, and the
    job publishes the best checkpoint's meta-model instead of the last. Image and uploaded-regression
    families need ``tasks.split.val_fraction > 0``; sinusoid, polynomial and hierarchical_normal draw fresh
    validation tasks."""

    checkpoint_every: Int = Field(100, ge=1)
    module_map_every: Int = Field(50, ge=1)
    log_every: Int = Field(10, ge=1)
    validate_every: OptInt = Field(
        None, ge=1, description="meta-steps between validations on the val split; None = no validation")
    validation_tasks: Int = Field(100, ge=1, le=10000, description="validation tasks per validation")
    validation_steps: OptInt = Field(
        None, ge=0, le=10000, description="adaptation steps on each validation task; None = inner.steps")
    validation_modules: Literal["all", "selected"] = Field(
        "selected", description="modules adapted during validation: selected (the default everywhere: every "
        "module under its learned prior unless sigma^2 separated, modules.selection) or all")
    patience: OptInt = Field(
        None, ge=1, description="stop after this many validations without improvement; None = never stop early")
    min_delta: float = Field(0.0, ge=0, allow_inf_nan=False,
                             description="an improvement must beat the best score by more than this")

    @model_validator(mode="after")
    def _validation(self):
        if self.validate_every is None and self.patience is not None:
            raise ValueError("patience needs validate_every")
        return self


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

    @model_validator(mode="after")
    def _compat(self):
        if self.inner.optimizer is None:
            name = self.algorithm.name
            self.inner.optimizer = "proximal_gd" if (name in SIGMA_ALGORITHMS or name == "imaml") else "sgd"
        fam, arch = self.tasks.family, self.model.arch
        name = self.algorithm.name
        image = fam in IMAGE_FAMILIES
        if self.inner.lr is None:
            self.inner.lr = (0.2 if name in IMPLICIT_ALGORITHMS else 0.4) if image else 0.01
        if self.outer.lr_phi is None:
            self.outer.lr_phi = 1e-2 if name in ("reptile", "sigma_reptile") else 1e-3
        if self.inner.steps is None:  # Reptile needs more than one step; implicit gradients need the MAP
            self.inner.steps = (20 if name in IMPLICIT_ALGORITHMS else
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
