"""YAML as recipes need it: a safe loader where ``1e-3`` is a float (YAML
1.2), duplicate keys refused, and every key path mapped to its line, so an
error can name ``file:line key.path``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from imgcls.errors import RecipeError


class Loader(yaml.SafeLoader):
    """Safe loader where ``1e-3`` is a float (YAML 1.2), as people expect."""


Loader.yaml_implicit_resolvers = copy.deepcopy(yaml.SafeLoader.yaml_implicit_resolvers)
Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)

Path_ = tuple[Any, ...]


def _walk(node: yaml.Node, path: Path_, lines: dict[Path_, int], where: str) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value
            line = key_node.start_mark.line + 1
            if key in seen:
                raise RecipeError(
                    f"{where}:{line} {format_path(path + (key,))}: duplicate key "
                    f"(first given on line {seen[key]})"
                )
            seen[key] = line
            lines[path + (key,)] = line
            _walk(value_node, path + (key,), lines, where)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, path + (i,), lines, where)


def format_path(path: Path_) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "(top)"


def _yaml_error(exc: yaml.MarkedYAMLError, where: str) -> str:
    """``file:line:column: problem``, at the spot PyYAML points to, plus where
    the construct it was reading began (an unclosed quote or bracket)."""
    mark = exc.problem_mark or exc.context_mark
    spot = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
    text = f"{where}{spot}: invalid YAML: {exc.problem or exc.context or exc}"
    context = exc.context_mark
    if exc.context and context is not None and mark is not None and context.line != mark.line:
        text += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
    return text


def read_yaml(text: str, where: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML safely; return the data and a map of key path -> line."""
    loader = Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[Path_, int] = {}
        if node is None:
            return None, lines
        _walk(node, (), lines, where)
        return loader.construct_document(node), lines
    except yaml.MarkedYAMLError as exc:
        raise RecipeError(_yaml_error(exc, where)) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{where}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()
