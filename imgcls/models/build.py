"""``build_model``: the one door from a model spec to an ``nn.Module``."""

from __future__ import annotations

from torch import nn

from imgcls import recipe as r
from imgcls.errors import RecipeError, ShapeError, UsageError
from imgcls.models import layers, zoo

Shape = tuple[int, ...]


def load_builtin_arch(name: str) -> list[r.Layer]:
    path = zoo.ARCH_DIR / f"{name}.yaml"
    raw, lines = r.read_yaml(path.read_text(), str(path))
    return r.recipe_from_dict(
        {"model": raw}, str(path), {("model", *k): v for k, v in lines.items()}
    ).model.layers or []


def build_model(spec: r.ModelSpec, input_shape: Shape, num_classes: int, log=None) -> nn.Module:
    """Build the network for ``input_shape`` (C, H, W) and ``num_classes``.

    Layer stacks are shape-checked as they are built; a classifier head is
    added when the stack does not already end in ``num_classes`` units; a
    trailing softmax is dropped, because training wants logits (predict
    applies softmax itself). ``model.stem: small`` and ``model.weights`` are
    applied here (imgcls.models.finetune); ``log`` hears what was loaded.
    """
    c, h, w = input_shape
    if spec.arch is not None:
        name = spec.arch
        if name.startswith("timm/"):
            if spec.stem != "default":
                raise UsageError(f"model.stem: small is not defined for timm models ('{name}')")
            model = zoo.build_timm(name[5:], (c, h, w), num_classes, spec.pretrained)
        elif name in zoo.builtin_archs():
            if spec.stem != "default":
                raise UsageError(f"model.stem: small is not defined for the built-in '{name}'")
            if spec.pretrained:
                raise UsageError(f"{name} has no pretrained weights")
            stack = load_builtin_arch(name)
            model = build_layers(stack, (c, h, w), num_classes, "auto", spec.l1, spec.l2, path=f"{name}.layers")
        elif name in zoo.torchvision_archs():
            model = zoo.build_torchvision(
                name, (c, h, w), num_classes, spec.pretrained, small_stem=spec.stem == "small", log=log
            )
        else:
            raise zoo.unknown_arch(name)
    else:
        model = build_layers(spec.layers or [], (c, h, w), num_classes, spec.head, spec.l1, spec.l2)
    if spec.weights:
        from pathlib import Path

        from imgcls.models.finetune import load_weights_file

        load_weights_file(model, Path(spec.weights).expanduser(), num_classes, log)
    return model


def build_layers(
    stack: list[r.Layer],
    input_shape: Shape,
    num_classes: int | None,
    head: str = "auto",
    l1: float = 0.0,
    l2: float = 0.0,
    path: str = "model.layers",
) -> nn.Sequential:
    stack = list(stack)
    if stack and stack[-1].kind == "activation" and stack[-1].spec.name == "softmax":
        stack.pop()
    elif stack and stack[-1].kind == "dense" and stack[-1].spec.activation == "softmax":
        stack[-1] = r.Layer(dense=stack[-1].spec.model_copy(update={"activation": "none"}))
    ctx = layers.Context(l1, l2)
    model, shape = layers.build_stack(stack, input_shape, path, ctx)
    if head == "auto" and num_classes is not None and shape != (num_classes,):
        if len(shape) != 1:
            raise ShapeError(
                f"{path}: the stack ends with a {'x'.join(map(str, shape))} feature map, "
                f"not {num_classes} class scores; end it with 'global_avg_pool' or "
                "'flatten' (a dense head is then added)"
            )
        model.add_module(
            "head", layers._tag(nn.Linear(shape[0], num_classes), r.Dense(units=num_classes), ctx)
        )
    model.output_shape = shape if head == "none" else (num_classes,)  # type: ignore[assignment]  # a plain attribute
    return model


def resolve_num_classes(recipe: r.Recipe, given: int | None = None) -> int:
    """Class count for a model built without data: --classes, the recipe, or the built-in set."""
    if given is not None:
        return given
    if recipe.model.num_classes is not None:
        return recipe.model.num_classes
    if recipe.data.source == "shapes":
        from imgcls.data.shapes import shape_classes

        return len(shape_classes(recipe.data.shapes))
    if recipe.model.layers:
        last = recipe.model.layers[-1]
        if last.kind == "dense":
            return last.spec.units
    raise RecipeError("the class count comes from the data; give --classes N or model.num_classes")
