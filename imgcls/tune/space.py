"""The search space: a YAML mapping from the dotted key paths ``--set`` uses
to a distribution, checked against the recipe schema before a trial runs
(errors name the space file's line)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls.errors import RecipeError
from imgcls.recipe import Recipe, read_yaml_file, recipe_from_dict

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")


@dataclass(frozen=True)
class Param:
    key: str  # dotted key path, as --set takes it
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high) or the choices
    line: int

    def suggest(self, trial) -> Any:
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, *self.values, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, *self.values)
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_categorical(self.key, list(self.values))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def with_params(raw: dict, params: dict[str, Any], where: str = "<recipe>") -> Recipe:
    """The recipe dict with ``params`` set as ``--set`` would, validated."""
    # values travel as JSON, which the recipe's YAML loader reads back exactly
    return recipe_from_dict(raw, where, overrides=[f"{k}={json.dumps(v)}" for k, v in params.items()])


def load_space(path: Path, raw_recipe: dict, where_recipe: str = "<recipe>") -> list[Param]:
    """Read and check a space file against the recipe it will modify."""
    data, lines = read_yaml_file(path, "space")
    if not isinstance(data, dict) or not data:
        raise RecipeError(
            f"{path}:1: a search space maps key paths to distributions, "
            "e.g. 'train.optimizer.lr: {loguniform: [1e-4, 1e-1]}'"
        )
    params = []
    for key, spec in data.items():
        line = lines.get((key,), 1)
        where = f"{path}:{line} {key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise RecipeError(f"{where}: give one distribution: {{{'|'.join(DISTRIBUTIONS)}: [...]}}")
        ((kind, values),) = spec.items()
        if kind not in DISTRIBUTIONS:
            import difflib

            close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(
                f"{where}: unknown distribution '{kind}'{hint} (choose from: {', '.join(DISTRIBUTIONS)})"
            )
        if not isinstance(values, list) or not values:
            raise RecipeError(
                f"{where}: {kind} takes a list, e.g. {kind}: {'[a, b]' if kind == 'choice' else '[low, high]'}"
            )
        if kind == "choice":
            bad = [v for v in values if not (v is None or isinstance(v, (bool, int, float, str)))]
            if bad:
                raise RecipeError(
                    f"{where}: choices must be plain values (numbers, text, true/false); got {bad[0]!r}"
                )
            if len(set(map(repr, values))) != len(values):
                raise RecipeError(f"{where}: a choice is listed twice")
        else:
            if len(values) != 2 or not all(_number(v) for v in values):
                raise RecipeError(f"{where}: {kind} takes [low, high], two numbers")
            low, high = values
            if kind == "int" and not all(isinstance(v, int) for v in values):
                raise RecipeError(f"{where}: int takes whole numbers [low, high]")
            if not low < high:
                raise RecipeError(f"{where}: low ({low}) must be below high ({high})")
            if kind == "loguniform" and low <= 0:
                raise RecipeError(f"{where}: loguniform needs low > 0 (got {low})")
        param = Param(str(key), kind, tuple(values), line)
        for value in values:  # every end of the range must make a valid recipe
            try:
                with_params(raw_recipe, {param.key: value}, where_recipe)
            except RecipeError as exc:
                message = str(exc)
                if message.startswith("--set "):  # "--set key: path: msg" -> "path: msg"
                    message = message.split(": ", 1)[1]
                if not message.startswith(param.key.split(".")[0]) and not message.startswith(param.key):
                    message = f"{param.key}: {message}"
                raise RecipeError(f"{path}:{line} {message} (with {param.key} = {value!r})") from None
        params.append(param)
    return params


def default_space_path(recipe_path: Path) -> Path:
    return recipe_path.with_name(recipe_path.stem + ".space.yaml")


def fmt(value: Any) -> str:
    """A sampled value as the trial lines show it."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
