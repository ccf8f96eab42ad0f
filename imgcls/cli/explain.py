"""`imgcls explain`: class-activation heatmaps of a checkpoint on image files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command, stderr
from imgcls.cli.render import explain_lines


@command
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files to explain.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Run folder or .safetensors checkpoint (default: newest run under ./runs)."
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="gradcam, gradcam++ or layercam.")] = "gradcam",
    layer: Annotated[
        str | None,
        typer.Option(
            help="Layer to explain, named as `imgcls summarize` names it (default: the last conv block)."
        ),
    ] = None,
    target: Annotated[
        list[str] | None,
        typer.Option(help="Class to explain (name or index; repeatable). Default: the predicted class."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the PNGs (default `<run>/explain/`).")] = None,
    filters: Annotated[
        bool, typer.Option("--filters", help="Also draw the first-layer filters as a grid.")
    ] = False,
    maps: Annotated[
        str | None,
        typer.Option("--maps", metavar="LAYER", help="Also draw each image's feature maps at LAYER."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Class-activation heatmaps: where in each image the model looked.

    One PNG per image (and per --target class) with the heatmap over the
    image as the model sees it. --json gives, per image, the predicted class,
    its probability, the heatmap's peak (pixels and fractions of the frame)
    and the share of the frame above half the peak. Unreadable images are
    skipped: exit 3 (2 when none could be read).

    Examples:

        imgcls explain photo.jpg --model runs/quickstart/1

        imgcls explain a.png b.png --method layercam --layer conv3 --target circle --json

        imgcls explain photo.jpg --filters --maps conv1
    """

    from imgcls.checkpoint import latest_run, load_checkpoint
    from imgcls.explain import explain as run_explain
    from imgcls.text import json_safe

    err = stderr()
    if model is None:
        model = str(latest_run())
        err.print(f"model: {model} (the most recent run; choose another with --model)", markup=False)
    result = run_explain(
        images,
        load_checkpoint(model),
        method=method,
        layer=layer,
        targets=target or [],
        out=out,
        filters=filters,
        maps=maps,
        log=lambda message: err.print(message, markup=False),
    )
    if as_json:
        print(json.dumps(json_safe(result.to_dict())), flush=True)
    else:
        print("\n".join(explain_lines(result)))
    result.raise_if_skipped()
