"""`imgcls export`: write a model file for other runtimes, checked against PyTorch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command, log_to_stderr
from imgcls.cli.render import export_lines


@command
def export(
    target: Annotated[
        str, typer.Argument(help="A run folder, `runs/<name>` (its latest run) or a .safetensors checkpoint.")
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", help="onnx, torchscript or safetensors (default: from --out's suffix)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="File to write (default: beside the checkpoint, e.g. `<run>/model.onnx`)."),
    ] = None,
    opset: Annotated[
        int | None, typer.Option(min=7, help="ONNX opset version (default: the exporter's).")
    ] = None,
    dynamic_batch: Annotated[
        bool,
        typer.Option(
            "--dynamic-batch/--static-batch", help="Leave the batch size free, or fix it to --batch-size."
        ),
    ] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="The batch size of a --static-batch export.")] = 1,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="An image file or folder to check the export on (repeatable)."),
    ] = None,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize",
            help="int8: ONNX Runtime static quantization (Conv, Gemm, MatMul), kept only if the "
            "accuracy on the run's validation split drops by at most --max-drop points.",
        ),
    ] = None,
    calibrate: Annotated[
        int | None,
        typer.Option(help="Calibrate int8 on this many of the run's training images (default 300)."),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(help="Accuracy points int8 may lose against float32 (default 1.0)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace an existing file (only once the new export passed its check); keep an int8 "
            "export that fails its accuracy gate (with a warning).",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a model file for other runtimes, checked against PyTorch first.

    The export is run (onnxruntime, torch.jit.load, safetensors) on check
    images: yours (--image), a few of the run's own when they are on disk,
    and fixed noise. It is kept only if its outputs match PyTorch's; class
    names and preprocessing travel inside the file.

    Examples:

        imgcls export runs/quickstart/1 --format onnx

        imgcls export runs/quickstart/1 --format torchscript --out deploy/model.pt

        imgcls export runs/quickstart --format onnx --static-batch --batch-size 8 --opset 17

        imgcls export best.safetensors --out model.onnx --image photos/ --json

        imgcls export runs/quickstart --format onnx --quantize int8 --calibrate 300 --max-drop 0.5
    """

    from imgcls.export import export_model

    result = export_model(
        target,
        fmt,
        out,
        opset=opset,
        dynamic_batch=dynamic_batch,
        batch_size=batch_size,
        force=force,
        images=image or [],
        log=log_to_stderr(quiet),
        quantize=quantize,
        calibrate=calibrate,
        max_drop=max_drop,
    )
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    print("\n".join(export_lines(result)))
