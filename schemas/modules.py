"""The ``modules`` section: how parameters are grouped into modules and how task-specific ones are selected
(Sec. 4.3)."""
from __future__ import annotations

import math
from typing import Literal, Optional

from pydantic import Field, model_validator

from .types import Int, PositiveFloat, Strict


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
