"""Field types and the strict base model shared by every section of the job configuration."""
from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainValidator, WithJsonSchema

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


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Range = Annotated[tuple[FiniteFloat, FiniteFloat], BeforeValidator(_json_array)]


def _check_range(name: str, r: Optional[Range]):
    if r is not None and not r[0] <= r[1]:
        raise ValueError(f"{name}: lower bound {r[0]} is above upper bound {r[1]}")


DatasetId = Annotated[str, Field(min_length=1, max_length=200)]
