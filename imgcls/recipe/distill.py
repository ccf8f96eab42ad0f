"""``train.distill``: knowledge distillation from a trained teacher.

``train.distill: {teacher: RUN_OR_EXPORT, temperature: 4, alpha: 0.5}``, or
``train.distill: RUN_OR_EXPORT`` for the defaults. The teacher is a run
folder, a checkpoint (``.safetensors``) or an export (``.onnx``, ``.pt``);
a relative path is read from the recipe's folder, as ``data.path`` is.
The loss (imgcls/training/distill.py)::

    alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * the usual loss
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, model_validator

from imgcls.recipe.types import Strict


class DistillSpec(Strict):
    """A frozen teacher's softened outputs as a second target."""

    teacher: Annotated[str, Field(min_length=1)]
    temperature: Annotated[float, Field(strict=True, gt=0)] = 4.0  # T: > 1 softens both distributions
    alpha: Annotated[float, Field(strict=True, ge=0, le=1)] = 0.5  # the weight of the teacher's term

    @model_validator(mode="before")
    @classmethod
    def _path_alone(cls, value: Any) -> Any:
        return {"teacher": value} if isinstance(value, str) else value
