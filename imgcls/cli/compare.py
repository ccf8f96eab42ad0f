"""`imgcls compare`: the lecture's timeline as a table (and a plot)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command, stderr, stdout
from imgcls.cli.summarize import _shape_option


@command
def compare(
    targets: Annotated[list[str], typer.Argument(help="Architecture names or recipe files.")],
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="One input shape CxHxW for all (default: each its own).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write accuracy vs MACs (PNG), bubble = params.")] = None,
) -> None:
    """Networks side by side: year, paper, params, MACs, memory, depth, ImageNet top-1.

    Examples:

        imgcls compare alexnet vgg16 googlenet resnet50 densenet121 mobilenet_v2

        imgcls compare resnet50 recipes/architectures/seresnet50.yaml --csv

        imgcls compare alexnet vgg16 resnet50 mobilenet_v2 --plot compare.png
    """
    from imgcls import compare as cmp

    if as_json and as_csv:
        raise typer.BadParameter("give --json or --csv, not both")
    if plot is not None:
        from imgcls.checkpoint import check_out_file

        check_out_file(plot)  # before the work: a missing or read-only folder is one line, exit 2
    entries = cmp.compare(targets, _shape_option(input))
    if plot is not None:
        left_out = cmp.plot(entries, plot)
        if left_out:
            stderr().print(f"not plotted (no top-1): {', '.join(left_out)}", markup=False)
    if as_json:
        print(cmp.to_json(entries))
    elif as_csv:
        print(cmp.to_csv(entries), end="")
    else:
        stdout().print(cmp.table(entries))
