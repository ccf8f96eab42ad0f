"""`imgcls predict`: top-k labels per file, streamed as a table, JSON lines or CSV."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from imgcls.cli.app import command, stderr, stdout
from imgcls.cli.render import prediction_csv_row, prediction_header, predictions_table

# --min-confidence and --score: predict and serve take the same two options
MinConfidence = Annotated[
    str | None,
    typer.Option(
        "--min-confidence",
        metavar="P|run",
        help="Answer 'unknown' when the top probability (or the --score) is below P, the "
        "probabilities still shown; 'run': the threshold `imgcls evaluate --suggest-threshold` "
        "stored beside the checkpoint. Multi-label: unknown when no label is on and the score is below P.",
    ),
]
Score = Annotated[
    str | None,
    typer.Option(
        "--score",
        metavar="msp|max-logit|energy|mahalanobis",
        help="The confidence score --min-confidence thresholds (default msp, the top probability; "
        "max-logit and energy are in logit units; mahalanobis: minus the distance to the training images' "
        "features, fitted by `imgcls evaluate --suggest-threshold`, checkpoints only).",
    ),
]


@command
def predict(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (recursive), patterns like 'photos/*.jpg', or - for names on stdin."
        ),
    ],
    null: Annotated[
        bool,
        typer.Option(
            "--null",
            "-0",
            help="With -: names on stdin end with a NUL byte, not a newline (`find -print0`, `xargs -0`).",
        ),
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Run folder, .safetensors checkpoint, or exported .onnx/.pt/.ts (default: newest run under ./runs).",
        ),
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="A torchvision architecture, with --pretrained: ImageNet labels.")
    ] = None,
    pretrained: Annotated[
        bool, typer.Option("--pretrained", help="Use the torchvision weights of --arch (downloaded once).")
    ] = False,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, help="Labels per file (capped at the class count).")
    ] = 3,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Mark files whose top probability is below this as unsure. Multi-label models: "
            "the probability a label needs, for every class (instead of the model's thresholds).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row.")] = False,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta", help="Test-time augmentation: average the logits with the left-right flipped image."
        ),
    ] = False,
    min_confidence: MinConfidence = None,
    score: Score = None,
) -> None:
    """Top-k labels for each image file.

    Unreadable files get an error line on stderr (and an error record in
    --json/--csv); the others are still predicted, and the exit code is 3
    (2 when none of the files could be read).

    Examples:

        imgcls predict photo.jpg other/*.png --model runs/quickstart/1

        imgcls predict ~/photos --json > labels.jsonl

        find . -name '*.jpg' | imgcls predict - --csv --top-k 1

        imgcls predict cat.jpg --arch resnet18 --pretrained

        find . -name '*.jpg' -print0 | imgcls predict - --null --json

        imgcls predict ~/photos --model runs/quickstart/1 --min-confidence run
    """

    import csv

    from imgcls.errors import PartialFailure, UsageError
    from imgcls.predict import Failure
    from imgcls.predict import predict as run_predict
    from imgcls.text import json_safe, one_line, shown

    if as_json and as_csv:
        raise UsageError("choose one of --json and --csv")
    if null and "-" not in paths:
        raise UsageError("--null is for names read from stdin: give - as a PATH")
    err = stderr()
    predictor, records = run_predict(
        paths,
        model=model,
        arch=arch,
        pretrained=pretrained,
        batch_size=batch_size,
        top_k=top_k,
        threshold=threshold,
        log=lambda message: err.print(message, markup=False),
        tta=tta,
        null=null,
        min_confidence=min_confidence,
        score=score,
    )
    task, k = predictor.task, max(1, min(top_k, len(predictor.classes)))
    rejection = min_confidence is not None
    writer = csv.writer(sys.stdout, lineterminator="\n") if as_csv else None
    if writer is not None:
        writer.writerow([*prediction_header(task, k, rejection), "error"])
    total = failed = 0
    rows = []
    for record in records:  # streamed: each file's line is out before the next is decoded
        total += 1
        is_failure = isinstance(record, Failure)
        if isinstance(record, Failure):
            failed += 1
            err.print(f"error: {shown(record.file)}: {one_line(record.error)}", markup=False)
        if as_json:
            print(json.dumps(json_safe(record.to_dict())), flush=True)
        elif writer is not None:
            writer.writerow(prediction_csv_row(record, task, k, is_failure, rejection))
            sys.stdout.flush()
        elif not is_failure:
            rows.append(record)
    if rows:
        stdout().print(predictions_table(rows, task, k))
    if failed == total:
        raise UsageError(f"none of the {total} files could be read")
    if failed:
        raise PartialFailure(f"{failed} of {total} files could not be read (the others were predicted)")
