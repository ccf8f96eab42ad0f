"""The recipe's scalar types and the strict base model every section shares."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field


class Strict(BaseModel):
    # allow_inf_nan=False: `lr: .inf` or `.nan` is a recipe error, not a run
    # that trains to the end on NaN
    model_config = ConfigDict(extra="forbid", frozen=False, validate_assignment=False, allow_inf_nan=False)


# Strict scalars: `epochs: true`, `epochs: 2.5` or `seed: "3"` are errors, not
# silently 1, 2 or 3. Ints are still welcome where a float is asked for.
Int = Annotated[int, Field(strict=True)]
Float = Annotated[float, Field(strict=True)]
Bool = Annotated[bool, Field(strict=True)]
# a recipe's name (and a tune study's): it names a folder under train.out
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


Activation = Literal[
    "relu", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh", "softmax", "none",
    "relu6", "hardswish", "hardsigmoid",
]
Padding = Union[Literal["valid", "same", "full"], Annotated[int, Field(strict=True, ge=0)]]
PosInt = Annotated[int, Field(strict=True, gt=0)]
Pair = Union[PosInt, tuple[PosInt, PosInt]]
