"""The ``tasks`` section: the task families, a union discriminated on ``family`` (or on ``dataset_id`` and
``ways`` for an uploaded dataset)."""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

from pydantic import ConfigDict, Discriminator, Field, Tag, model_validator

from .types import DatasetId, Int, OptInt, PositiveFloat, FiniteFloat, Range, Strict, _check_range


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
