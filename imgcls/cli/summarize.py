"""`imgcls summarize` and `imgcls models`: a network's shapes and costs, the named architectures."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from imgcls.cli.app import command, stderr, stdout


def _shape_option(value: str | None):
    if value is None:
        return None
    from imgcls.recipe import parse_shape

    try:
        return parse_shape(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


@command
def summarize(
    target: Annotated[
        str,
        typer.Argument(
            help="A recipe file, a run folder or checkpoint, or an architecture name (see `imgcls models`)."
        ),
    ],
    input: Annotated[
        str | None,
        typer.Option("--input", "-i", help="Input shape CxHxW, e.g. 3x224x224 (HxW alone means 3 channels)."),
    ] = None,
    classes: Annotated[int | None, typer.Option("--classes", "-c", min=1, help="Number of classes.")] = None,
    depth: Annotated[
        int | None, typer.Option("--depth", "-d", min=0, help="Fold modules nested deeper than N.")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe value: key.path=value (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Layer-by-layer output shapes, parameters and MACs, without allocating weights.

    Examples:

        imgcls summarize vgg16

        imgcls summarize resnet18 --input 1x64x64 --classes 10 --depth 2

        imgcls summarize recipes/quickstart.yaml --json
    """
    from imgcls.summary import summarize_target, summary_table, totals_lines

    if set_ is None:
        set_ = []
    summary = summarize_target(target, _shape_option(input), classes, overrides=set_)
    if depth is not None:
        summary = summary.fold(depth)
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    out = stdout()
    out.print(summary_table(summary))
    for line in totals_lines(summary):
        out.print(line)


@command
def models(
    pattern: Annotated[str, typer.Argument(help="Wildcard filter, e.g. 'resnet*' or 'timm/vit*'.")] = "*",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the named architectures `model: {arch: NAME}` accepts.

    Examples:

        imgcls models

        imgcls models 'efficientnet*'
    """
    from imgcls.models.zoo import list_archs

    names = list_archs(pattern)
    if as_json:
        print(json.dumps(names))
    else:
        for name in names:
            print(name)
    if not names:
        stderr().print(f"no architecture matches '{pattern}' (see `imgcls models`)", markup=False)
