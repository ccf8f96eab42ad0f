"""Fine-tuning: a network's stages, freezing, per-stage learning rates, local
weights, and the small-image stem.

Stages are read from the model's structure, not from a list per name:

- a recipe stack (``nn.Sequential`` from ``build_layers``): each top-level
  layer with parameters is a stage;
- torchvision / timm models: the top-level children (ResNet: stem, layer1..4),
  with a container of blocks (``features``, ``trunk_output``, ``blocks``,
  ``stages``, ``layers``, a ViT's ``encoder.layers``) expanded into its blocks,
  and the leading loose layers (ResNet's ``conv1``, ``bn1``) merged into one
  stem stage.

The classifier (the top-level child holding the last Linear / Conv layer) is
never a stage: ``freeze: backbone`` freezes everything else, ``head_lr``
scales it.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable
from pathlib import Path
from typing import cast

from torch import nn

from imgcls.errors import CheckpointError, RecipeError, UsageError

Log = Callable[[str], None]


# --------------------------------------------------------------------------- structure


def head_name(model: nn.Module) -> str | None:
    """Top-level child holding the last Linear / Conv2d (the class scores)."""
    last = None
    for name, module in model.named_modules():
        if name and isinstance(module, (nn.Linear, nn.Conv2d)):
            last = name
    return None if last is None else last.split(".")[0]


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


# containers of blocks: expanded, their blocks are the stages (torchvision
# features / trunk_output, ViT encoder.layers; timm blocks / stages / layers)
CONTAINERS = ("features", "trunk_output", "blocks", "stages", "layers")


def _units(model: nn.Module, head: str | None):
    flat = isinstance(model, nn.Sequential)  # a recipe stack: one stage per layer
    for name, child in model.named_children():
        if name == head or not _has_params(child):
            continue
        inner: nn.Module = child
        prefix = name
        if name == "encoder" and isinstance(getattr(child, "layers", None), nn.Sequential):
            inner, prefix = cast(nn.Module, child.layers), f"{name}.layers"
        if (
            not flat
            and (name in CONTAINERS or inner is not child)
            and isinstance(inner, (nn.Sequential, nn.ModuleList))
        ):
            for block, sub in inner.named_children():
                if _has_params(sub):
                    yield f"{prefix}.{block}", sub, False
        else:
            yield name, child, flat


def stages(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Ordered (stage name, module names) from input to output, the head left out."""
    out: list[tuple[str, list[str]]] = []
    stem: list[str] = []
    for name, unit, flat in _units(model, head_name(model)):
        if not flat and not list(unit.children()) and not out:
            stem.append(name)  # loose layers before the first block (ResNet conv1, bn1): one stem
            continue
        if stem:
            out.append(("stem", stem))
            stem = []
        out.append((name, [name]))
    if stem:
        out.append(("stem", stem))
    return out


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def param_stage(model: nn.Module) -> dict[str, int]:
    """Parameter name -> stage index; the head is ``len(stages)``. Parameters of
    no stage (a ViT's class token on the model itself) belong to stage 0."""
    found = stages(model)
    head = head_name(model)
    out = {}
    previous = 0
    for pname, _ in model.named_parameters():
        if head is not None and _under(pname, [head]):
            out[pname] = len(found)
            continue
        # a parameter outside every stage (a ViT's position embedding, its final
        # norm) goes with the stage before it in the model's order
        previous = next((i for i, (_, mods) in enumerate(found) if _under(pname, mods)), previous)
        out[pname] = previous
    return out


# --------------------------------------------------------------------------- freezing


def freeze_spec(recipe) -> str | int | list[str] | None:
    """What the recipe freezes at the start: ``model.freeze``, or the backbone
    when only ``train.unfreeze_at`` is given (head alone for E epochs)."""
    if recipe.model.freeze is not None:
        return recipe.model.freeze
    if recipe.train.unfreeze_at:
        return "backbone"
    return None


def frozen_names(model: nn.Module, spec: str | int | list[str] | None) -> set[str]:
    """Names of the parameters ``spec`` freezes (model.freeze)."""
    if spec is None:
        return set()
    names = [n for n, _ in model.named_parameters()]
    where = param_stage(model)
    n_stages = len(stages(model))
    if spec == "backbone":
        if head_name(model) is None:
            raise RecipeError("model.freeze: backbone: the model has no classifier layer to keep training")
        return {n for n in names if where[n] < n_stages}
    if isinstance(spec, int):
        if spec > n_stages:
            raise RecipeError(
                f"model.freeze: {spec}: the model has only {n_stages} stages before its classifier"
            )
        return {n for n in names if where[n] < spec}
    out: set[str] = set()
    for pattern in spec:
        # a pattern names parameters (layer1.0.conv1.weight) or modules (layer1*)
        hit = {
            n for n in names if fnmatch.fnmatch(n, pattern) or fnmatch.fnmatch(n.rsplit(".", 1)[0], pattern)
        }
        hit |= {n for n in names if any(fnmatch.fnmatch(p, pattern) for p in _prefixes(n))}
        if not hit:
            raise RecipeError(
                f"model.freeze: '{pattern}' matches no parameter (names look like {names[0] if names else '-'})"
            )
        out |= hit
    return out


def _prefixes(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def set_frozen(model: nn.Module, frozen: set[str]) -> None:
    """requires_grad off for ``frozen``, on for every other parameter."""
    for name, p in model.named_parameters():
        p.requires_grad_(name not in frozen)


def hold_frozen_norms(model: nn.Module) -> None:
    """After ``model.train()``: batch norms whose parameters are all frozen go back
    to eval mode, so their running statistics stay the pretrained ones."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()


def frozen_at(model: nn.Module, recipe, epoch: int) -> set[str]:
    """The parameters frozen during ``epoch`` (0-based): a pure function of the
    epoch, so a resumed run freezes exactly what the uninterrupted one did."""
    unfreeze = recipe.train.unfreeze_at
    if unfreeze is not None and epoch >= unfreeze:
        return set()
    return frozen_names(model, freeze_spec(recipe))


# --------------------------------------------------------------------------- learning rates


def param_groups(model: nn.Module, spec) -> list[dict]:
    """Optimizer groups: weight decay on weights (ndim > 1) only, and with
    ``layer_decay`` / ``head_lr`` one pair of groups per stage with its
    ``lr_scale`` (the training loop sets lr = schedule(step) * lr_scale).

    Every parameter is in a group, frozen or not: freezing only turns
    requires_grad off, so unfreezing needs no new group and the optimizer
    state (and a resume across the switch) stays exact.
    """
    params = list(model.named_parameters())
    if spec.layer_decay is None and spec.head_lr is None:
        return [
            {"params": [p for _, p in params if p.ndim > 1], "weight_decay": spec.weight_decay},
            {"params": [p for _, p in params if p.ndim <= 1], "weight_decay": 0.0},
        ]
    where = param_stage(model)
    n = len(stages(model))
    decay = spec.layer_decay if spec.layer_decay is not None else 1.0
    groups = []
    for stage in range(n + 1):
        scale = (spec.head_lr or 1.0) if stage == n else decay ** (n - stage)
        for wd, keep in ((spec.weight_decay, lambda p: p.ndim > 1), (0.0, lambda p: p.ndim <= 1)):
            members = [p for name, p in params if where[name] == stage and keep(p)]
            if members:
                groups.append({"params": members, "weight_decay": wd, "lr_scale": scale, "stage": stage})
    return groups


# --------------------------------------------------------------------------- local weights


def load_weights_file(model: nn.Module, path: Path, num_classes: int, log: Log | None = None) -> None:
    """Load a local ``.safetensors`` file (an imgcls checkpoint or a plain state
    dict, wrapper prefixes stripped) into ``model``. A classifier whose class
    count differs is left freshly initialised, and said so; any other
    mismatch is an error naming the tensors."""
    from safetensors.torch import load_file

    from imgcls.models.state import clean_state_dict

    if path.suffix.lower() != ".safetensors":
        raise UsageError(f"model.weights: {path}: only .safetensors files are read (no pickle)")
    if not path.is_file():
        raise CheckpointError(f"model.weights: {path}: no such file")
    try:
        state = clean_state_dict(load_file(str(path)))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"model.weights: {path}: not a readable safetensors file ({exc})") from None
    own = model.state_dict()
    head = head_name(model)
    mismatched = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    replaced = []
    if head is not None:
        replaced = [k for k in mismatched if _under(k, [head])]
        for k in replaced:
            del state[k]
        mismatched = [k for k in mismatched if k not in replaced]
    if mismatched:
        k = mismatched[0]
        raise CheckpointError(
            f"model.weights: {path}: {k} has shape {list(state[k].shape)}, the model expects {list(own[k].shape)}"
        )
    missing = [k for k in own if k not in state and k not in replaced]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:3])}"] if missing else []
        parts += [f"unexpected {', '.join(unexpected[:3])}"] if unexpected else []
        raise CheckpointError(f"model.weights: {path}: keys do not fit the model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=False)
    if log is not None:
        log(f"weights from {path}")
        if replaced:
            log(
                f"the file's classifier ({head}) has another class count: replaced by a new {num_classes}-class one"
            )


def freeze_line(model: nn.Module, recipe) -> str | None:
    """What training says about freezing, once, at the start."""
    spec = freeze_spec(recipe)
    if spec is None:
        return None
    frozen = frozen_names(model, spec)
    total = sum(p.numel() for p in model.parameters())
    count = sum(p.numel() for n, p in model.named_parameters() if n in frozen)
    until = (
        f"until epoch {recipe.train.unfreeze_at} (train.unfreeze_at), then all train"
        if recipe.train.unfreeze_at
        else "for the whole run"
    )
    shown = spec if not isinstance(spec, list) else ", ".join(spec)
    return f"frozen ({shown}): {count:,} of {total:,} parameters, {until}"
