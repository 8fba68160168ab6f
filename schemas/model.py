"""The ``model`` section: the architectures, a union discriminated on ``arch``."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BeforeValidator, Field

from .types import Int, Strict, _json_integer


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
