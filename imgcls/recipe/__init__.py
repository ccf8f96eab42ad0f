"""The recipe: YAML in, typed and validated objects out, parsed once.

Everything downstream receives a :class:`Recipe`; nothing handles raw dicts.
Errors name the file, the line and the key path::

    recipe.yaml:12 model.layers[3].conv.kernel: Input should be greater than 0

- :mod:`~imgcls.recipe.schema`: the pydantic models (the layer vocabulary, data, model, train);
- :mod:`~imgcls.recipe.syntax`: safe YAML with line numbers;
- :mod:`~imgcls.recipe.overrides`: ``--set key.path=value``;
- :mod:`~imgcls.recipe.loading`: file + overrides -> :class:`Recipe`, and back.
"""

from __future__ import annotations

from imgcls.recipe.loading import (
    dump_yaml,
    load_recipe,
    read_yaml_file,
    recipe_from_dict,
    recipe_to_dict,
)
from imgcls.recipe.overrides import (
    apply_override,
)
from imgcls.recipe.schema import (
    LAYER_KINDS,
    NAME_PATTERN,
    Activation,
    ActivationLayer,
    AugmentSpec,
    BatchNorm,
    Bool,
    ColorJitter,
    Conv,
    DataSpec,
    Dense,
    Depthwise,
    Dropout,
    EarlyStopping,
    EMASpec,
    Empty,
    Float,
    Int,
    Layer,
    ModelSpec,
    OptimizerSpec,
    Padding,
    Pair,
    Parallel,
    Pool,
    PosInt,
    RandAugment,
    RandomCrop,
    RandomResizedCrop,
    Recipe,
    Regularized,
    Repeat,
    Residual,
    ScheduleSpec,
    Separable,
    ShapesSpec,
    Strict,
    TrainSpec,
    Windowed,
    parse_shape,
)
from imgcls.recipe.syntax import (
    Loader,
    Path_,
    format_path,
    read_yaml,
)

__all__ = [
    "NAME_PATTERN",
    "Activation",
    "ActivationLayer",
    "AugmentSpec",
    "BatchNorm",
    "Bool",
    "ColorJitter",
    "Conv",
    "DataSpec",
    "Dense",
    "Depthwise",
    "Dropout",
    "EMASpec",
    "EarlyStopping",
    "Empty",
    "Float",
    "Int",
    "LAYER_KINDS",
    "Layer",
    "Loader",
    "ModelSpec",
    "OptimizerSpec",
    "Padding",
    "Pair",
    "Parallel",
    "Path_",
    "Pool",
    "PosInt",
    "RandAugment",
    "RandomCrop",
    "RandomResizedCrop",
    "Recipe",
    "Regularized",
    "Repeat",
    "Residual",
    "ScheduleSpec",
    "Separable",
    "ShapesSpec",
    "Strict",
    "TrainSpec",
    "Windowed",
    "apply_override",
    "dump_yaml",
    "format_path",
    "load_recipe",
    "parse_shape",
    "read_yaml",
    "read_yaml_file",
    "recipe_from_dict",
    "recipe_to_dict",
]
