"""Loading a recipe: a YAML file (or a dict) plus overrides -> a validated
:class:`~imgcls.recipe.schema.Recipe`, with errors that name the file, the
line and the key path; and back to plain data / YAML for run folders.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from imgcls.errors import RecipeError
from imgcls.recipe.overrides import apply_override
from imgcls.recipe.schema import LAYER_KINDS, Layer, Recipe, did_you_mean, inner_model, shown
from imgcls.recipe.syntax import Path_, format_path, read_yaml

_TYPE_TAG = re.compile(r"[\[\]\-]")
_TYPE_NAMES = {"int", "float", "str", "bool", "list", "dict", "tuple"}


def _explain(exc: ValidationError, where: str, lines: dict[Path_, int], overridden: dict) -> str:
    # a typo gives "unknown key" and "field required" at once: the first explains both
    errors = exc.errors()
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    # drop pydantic's union-member tags ("constrained-int", "literal[...]")
    loc = tuple(p for p in err["loc"] if isinstance(p, int) or not (_TYPE_TAG.search(p) or p in _TYPE_NAMES))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in ("int_type", "float_type", "bool_type", "finite_number", "literal_error"):
        msg += f", not {shown(err.get('input'))}"
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        known = list(parent.model_fields) if parent else []
        msg = did_you_mean("key", str(loc[-1]), known)
        if known:
            msg += f" (allowed: {', '.join(known)})"
    elif err["type"] == "literal_error" and "expected" in err.get("ctx", {}):
        options = re.findall(r"'([^']*)'", err["ctx"]["expected"])
        if options and isinstance(err.get("input"), str):
            msg = did_you_mean("value", err["input"], options) + f" (choose from: {', '.join(options)})"
    path = format_path(loc)
    for given, text in overridden.items():
        if given[: len(loc)] == loc or loc[: len(given)] == given:
            return f"--set {text}: {path}: {msg}"
    for n in range(len(loc), -1, -1):
        if loc[:n] in lines:
            return f"{where}:{lines[loc[:n]]} {path}: {msg}"
    return f"{where} {path}: {msg}"


def _model_at(loc: Path_) -> type[BaseModel] | None:
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        if model is Layer and part in LAYER_KINDS:
            model = LAYER_KINDS[part]
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = inner_model(field.annotation)
        if model is None:
            return None
    return model


def recipe_from_dict(
    raw: Any,
    where: str = "<recipe>",
    lines: dict[Path_, int] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Recipe:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}:1: a recipe is a mapping with name, data, model, train")
    raw = copy.deepcopy(raw)
    overridden: dict[Path_, str] = {}
    for assignment in overrides:
        path = apply_override(raw, assignment)
        overridden[path] = assignment.split("=", 1)[0].strip()
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(_explain(exc, where, lines or {}, overridden)) from None


def read_yaml_file(path: Path, what: str = "recipe") -> tuple[Any, dict[Path_, int]]:
    """:func:`read_yaml` of a file; a missing or unreadable one is a RecipeError naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(f"{path}: no such {what} file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read: {exc}") from None
    return read_yaml(text, str(path))


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    raw, lines = read_yaml_file(path)
    if raw is not None and isinstance(raw, dict) and "name" not in raw:
        raw["name"] = re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem) or "recipe"
    return recipe_from_dict(raw, str(path), lines, overrides)


def recipe_to_dict(recipe: Recipe) -> dict:
    """The resolved recipe as plain data (for run folders and checkpoints)."""
    return recipe.model_dump(mode="json", exclude_none=True)


def dump_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
