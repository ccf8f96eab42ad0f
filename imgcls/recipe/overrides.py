"""``--set key.path=value``: dotted-path overrides applied to a raw recipe
before it is validated (the value is read as YAML: ``3``, ``3e-3``, ``[1, 2]``)."""

from __future__ import annotations

import re
from typing import Any

import yaml

from imgcls.errors import RecipeError
from imgcls.recipe.syntax import Loader, format_path


def apply_override(raw: dict, assignment: str) -> tuple[Any, ...]:
    """Apply ``train.epochs=3`` to a raw recipe dict; return the key path."""
    key, sep, value_text = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {assignment}: expected key=value, e.g. train.epochs=3")
    try:
        value = yaml.load(value_text, Loader=Loader) if value_text.strip() else ""
    except yaml.YAMLError:
        value = value_text
    parts: list[Any] = []
    for token in key.split("."):
        m = re.fullmatch(r"([^\[\]]+)((?:\[\d+\])*)", token)
        if not m:
            raise RecipeError(f"--set {key}: cannot read the key path")
        parts.append(m.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", m.group(2)))
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise RecipeError(f"--set {key}: {format_path(tuple(parts[: i + 1]))} does not exist")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {key}: {format_path(tuple(parts[:i]))} is not a mapping")
        if node.get(part) is None:
            node[part] = [] if isinstance(nxt, int) else {}
        node = node[part]
    last = parts[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise RecipeError(f"--set {key}: index {last} does not exist")
    elif not isinstance(node, dict):
        raise RecipeError(f"--set {key}: {format_path(tuple(parts[:-1]))} is not a mapping")
    node[last] = value
    return tuple(parts)
