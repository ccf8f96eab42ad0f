"""`imgcls evaluate`: metrics of a checkpoint on labelled images, then the
optional steps (thresholds, the error gallery, the report), then the report on stdout."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command, log_to_stderr, stdout


@command
def evaluate(
    target: Annotated[str, typer.Argument(help="A run folder or a .safetensors checkpoint.")],
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Labelled images: a folder of class folders (or its test/ or val/), or a CSV. Default: the run's own test or val split."
        ),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, help="k for top-k accuracy (capped at the class count).")
    ] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 128,
    out: Annotated[
        Path | None, typer.Option(help="Folder for confusion.png and metrics.json (default `<run>/eval/`).")
    ] = None,
    misclassified: Annotated[
        Path | None,
        typer.Option(help="Write file,true,predicted,confidence of each wrong image to this CSV."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    explain: Annotated[
        bool, typer.Option("--explain", help="Overlay Grad-CAM heatmaps on the error gallery.")
    ] = False,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta",
            help="Also report the metrics with test-time augmentation (logits averaged with the flipped image).",
        ),
    ] = False,
    tune_thresholds: Annotated[
        bool,
        typer.Option(
            "--tune-thresholds",
            help="Multi-label: pick each class's F1-optimal threshold on the run's validation split, "
            "write them into `<checkpoint>-tuned.safetensors` and evaluate with them.",
        ),
    ] = False,
    min_confidence: Annotated[
        str | None,
        typer.Option(
            "--min-confidence",
            metavar="P|run",
            help="Open set: count images whose top probability (or --score) is below P as 'unknown'; "
            "report coverage, accuracy on the accepted, AURC and risk_coverage.csv/.png. "
            "'run': the threshold --suggest-threshold stored.",
        ),
    ] = None,
    score: Annotated[
        str | None,
        typer.Option(
            "--score",
            metavar="msp|max-logit|energy|mahalanobis",
            help="The confidence score to threshold (default: msp for --min-confidence P; for "
            "--suggest-threshold, mahalanobis: the distance to the training images' features, fitted on "
            "the run's training split; checkpoints only).",
        ),
    ] = None,
    suggest_threshold: Annotated[
        bool,
        typer.Option(
            "--suggest-threshold",
            help="Pick the --min-confidence that keeps --coverage of the run's validation images, "
            "store it beside the checkpoint (predict --min-confidence run) and evaluate with it.",
        ),
    ] = False,
    coverage: Annotated[
        float | None,
        typer.Option(help="The share of validation images --suggest-threshold keeps (default 0.95)."),
    ] = None,
) -> None:
    """Accuracy, top-k, loss, per-class precision/recall/F1 and the confusion matrix.

    Multi-label models: per-class precision/recall/F1/AP at each class's
    threshold, micro and macro F1, mAP and the exact-match ratio.

    The confusion matrix is always saved as a PNG in the output folder.
    Unreadable images are skipped: the report covers the others and the exit
    code is 3 (2 when none could be read).

    Examples:

        imgcls evaluate runs/quickstart/1

        imgcls evaluate runs/quickstart/1/best.safetensors ~/pets/test --misclassified wrong.csv

        imgcls evaluate runs/quickstart/1 labels.csv --json

        imgcls evaluate runs/quickstart/1 --suggest-threshold --coverage 0.95
    """
    from imgcls.evaluate import report_renderables
    from imgcls.rejection import check_options, open_set_renderables
    from imgcls.text import json_safe

    check_options(min_confidence, score, suggest_threshold, coverage)

    result = evaluate_steps(
        target,
        data,
        top_k=top_k,
        batch_size=batch_size,
        out=out,
        misclassified=misclassified,
        log=log_to_stderr(),
        explain=explain,
        tta=tta,
        tune_thresholds=tune_thresholds,
        open_set=(min_confidence, score, (coverage or 0.95) if suggest_threshold else None),
    )
    if as_json:
        print(json.dumps(json_safe(result.to_dict())), flush=True)
    else:
        console = stdout()
        for renderable in report_renderables(result) + open_set_renderables(result):
            console.print(renderable)
    result.raise_if_skipped()  # exit 3 once the report is out


def evaluate_steps(
    target: str | Path,
    data: Path | None = None,
    *,
    top_k: int = 5,
    batch_size: int = 128,
    out: Path | None = None,
    misclassified: Path | None = None,
    log: Callable[[str], None] = lambda message: None,
    explain: bool = False,
    tta: bool = False,
    tune_thresholds: bool = False,
    open_set: tuple[str | None, str | None, float | None] = (None, None, None),
):
    """What `imgcls evaluate` does, step by step: thresholds (when asked), the
    metrics, the error gallery beside the confusion matrix, and the run's
    report.html refreshed (a failure there is a warning: the metrics are written).
    ``open_set``: (--min-confidence, --score, the --suggest-threshold coverage or None)
    (:mod:`imgcls.rejection`)."""
    from imgcls.checkpoint import check_out_dir, check_out_file, load_checkpoint
    from imgcls.evaluate import default_out_dir, evaluate, write_metrics_json
    from imgcls.metadata import task_of
    from imgcls.rejection import add_open_set, resolve, suggest_threshold
    from imgcls.thresholds import tune_thresholds as tune

    # outputs first, as train --out: a missing or read-only folder is one line before the work
    if out is not None:
        check_out_dir(out, empty=False)
    if misclassified is not None:
        check_out_file(misclassified)
    ckpt = load_checkpoint(target)
    tuned = tune(ckpt, batch_size=batch_size, log=log) if tune_thresholds else None
    min_confidence, score, coverage = open_set
    rejection, suggestion = None, None
    if coverage is None:
        rejection = resolve(ckpt, min_confidence, score)
    else:
        rejection, suggestion = suggest_threshold(
            ckpt, coverage=coverage, score=score, batch_size=batch_size, log=log
        )
    result = evaluate(
        ckpt,
        data,
        top_k=top_k,
        batch_size=batch_size,
        out=out,
        misclassified=misclassified,
        log=log,
        tta=tta,
        tuned=tuned,
    )
    if rejection is not None:
        add_open_set(result, rejection, suggestion, log, (ckpt, data, batch_size))
    if task_of(ckpt.meta) != "multilabel":  # the gallery of the confused pairs (imgcls.explain)
        from imgcls.explain import write_error_gallery

        gallery = write_error_gallery(
            (result.out_dir or default_out_dir(ckpt)) / "errors.png",
            ckpt,
            result.misclassified,
            result.report["confused_pairs"],
            with_heatmaps=explain,
        )
        if gallery is not None:
            result.files["errors_png"] = str(gallery)
            write_metrics_json(result)
    if ckpt.run_dir is not None and result.out_dir == ckpt.run_dir / "eval":
        try:
            from imgcls.report import write_report

            write_report(ckpt.run_dir)
        except Exception as exc:  # a report is a convenience; the metrics are written
            log(f"warning: could not refresh {ckpt.run_dir / 'report.html'}: {exc}")
    return result
