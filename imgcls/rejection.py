"""The open-set steps of ``imgcls evaluate`` (the scores and curves are :mod:`imgcls.openset`).

``--suggest-threshold [--coverage 0.95] [--score S]``: before the metrics,
the threshold that keeps that share of the run's validation images, written
beside the checkpoint (``best.openset.json``: ``predict --min-confidence run``
reads it) and then evaluated with. The default score, ``mahalanobis``
(:mod:`imgcls.openset_features`), first fits its statistics on the run's
training split and writes them beside the checkpoint too
(``best.openset.safetensors``).

``--min-confidence P|run``: after the metrics, coverage and accuracy of the
images the threshold accepts, the AURC of every score, and the risk-coverage
curve (``risk_coverage.csv`` and ``.png`` in the output folder), added to
the result under ``open_set``.

Single-label models only: a multi-label model's ``unknown`` (no label on and
a low score) is a predict-time answer without a "wrong" to count.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from imgcls import interrupts
from imgcls.checkpoint import Checkpoint, check_out_file
from imgcls.errors import UsageError
from imgcls.evaluate import EvalResult, Items, labelled_items, run_split, score_items, write_metrics_json
from imgcls.io import atomic_path, write_text_atomic
from imgcls.metadata import task_of
from imgcls.openset import (
    DEFAULT_SCORE,
    FEATURE_SCORES,
    SUGGEST_SCORE,
    Rejection,
    parse_min_confidence,
    selective_report,
    selective_summary,
    stored_path,
    stored_record,
    stored_rejection,
    threshold_for_coverage,
)
from imgcls.openset_features import HeadInputs, fit_mahalanobis, load_statistics, save_statistics, stats_path

Log = Callable[[str], None]


def check_options(
    min_confidence: str | None, score: str | None, suggest: bool, coverage: float | None
) -> None:
    """The open-set options of evaluate, checked before any work (one line each)."""
    if suggest and min_confidence is not None:
        raise UsageError("give --suggest-threshold or --min-confidence, not both (the suggestion is used)")
    if coverage is not None and not suggest:
        raise UsageError("--coverage is the share --suggest-threshold keeps: add --suggest-threshold")
    if suggest:
        parse_min_confidence("0", score)  # the score's name
        if coverage is not None and not 0.0 < coverage <= 1.0:
            raise UsageError(f"--coverage {coverage}: give a share in (0, 1], e.g. 0.95")
    else:
        parse_min_confidence(min_confidence, score)


def refuse_multilabel(ckpt: Checkpoint) -> None:
    if task_of(ckpt.meta) == "multilabel":
        raise UsageError(
            f"{ckpt.path}: --min-confidence and --suggest-threshold in evaluate are for single-label "
            "models (risk: a wrong top class); for a multi-label model give predict --min-confidence P "
            "(unknown: no label on and the score below P)"
        )


def suggest_threshold(
    ckpt: Checkpoint, *, coverage: float, score: str | None, batch_size: int, log: Log
) -> tuple[Rejection, dict]:
    """Pick the threshold on the run's validation split; write it beside the checkpoint."""
    refuse_multilabel(ckpt)
    check_out_file(stored_path(ckpt.path))  # a read-only run folder: one line before the work
    kind = score or SUGGEST_SCORE
    scorer, fitted = None, None
    if kind in FEATURE_SCORES:
        check_out_file(stats_path(ckpt.path))
        train, on = _train_split(ckpt)
        log(f"fitting the {kind} statistics on {on}: {len(train)} images")
        _, train_features, train_targets, _ = feature_pass(ckpt, train, batch_size)
        assert train_features is not None, "feature_pass records them by default"
        scorer, fitted = fit_mahalanobis(train_features, train_targets), on
    items, where = run_split(ckpt, "val")
    log(f"picking the {kind} threshold that keeps {coverage:.0%} of {where}: {len(items)} images")
    logits, features, targets, files = feature_pass(ckpt, items, batch_size, scorer is not None)
    if not files:
        raise UsageError(f"{where}: none of the {len(items)} images could be read")
    scores = Rejection(0.0, kind, scorer=scorer).scores(logits, features)
    rejection = Rejection(threshold_for_coverage(scores, coverage), kind, "--suggest-threshold", scorer)
    kept = selective_summary(scores, logits.argmax(1) == targets, rejection.threshold)
    interrupts.check()  # nothing written yet
    if scorer is not None and fitted is not None:  # the statistics first: the threshold is for them
        log(f"wrote {save_statistics(ckpt.path, scorer, fitted)} (the training images' features)")
    path = stored_path(ckpt.path)
    record = stored_record(ckpt.path, rejection, coverage, where, len(files))
    write_text_atomic(path, json.dumps(record, indent=2) + "\n")
    log(
        f"threshold: {kind} {rejection.threshold:.6g} keeps {kept['coverage']:.1%} of {where} "
        f"(accuracy {kept['accuracy_accepted']:.4f} on those, {kept['accuracy_all']:.4f} on all); "
        f"wrote {path} (predict --min-confidence run uses it)"
    )
    suggestion = {"coverage_target": coverage, "split": where, "file": str(path), "validation": kept}
    if scorer is not None:  # the validation pass, for add_open_set when it evaluates the same split
        suggestion["outputs"] = (logits, features, targets)
    return rejection, suggestion


def resolve(ckpt: Checkpoint, min_confidence: str | None, score: str | None) -> Rejection | None:
    """``--min-confidence`` for evaluate: a number, or ``run`` (stored beside the checkpoint)."""
    number, stored = parse_min_confidence(min_confidence, score)
    if number is None and stored is None:
        return None
    refuse_multilabel(ckpt)
    rejection = (
        Rejection(number, score or DEFAULT_SCORE)
        if number is not None
        else stored_rejection(ckpt.path, score)
    )
    if rejection.score in FEATURE_SCORES:
        return rejection.scored_by(load_statistics(ckpt.path))
    return rejection


def _train_split(ckpt: Checkpoint) -> tuple[Items, str]:
    """The run's training images (what a feature score's statistics are fitted on)."""
    from imgcls.data.sources import open_source

    source = open_source(ckpt.recipe.data, ckpt.run_dir or ckpt.path.parent)
    if not source.train:
        raise UsageError(f"{ckpt.path}: the run has no training images to fit the feature statistics on")
    return [(p, source.classes[label]) for p, label in source.train], f"the run's train split ({source.root})"


def feature_pass(
    ckpt: Checkpoint, items: Items, batch_size: int, features: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, list[Path]]:
    """(logits, features, targets, files read) of ``items``: one pass of the checkpoint's
    model, the classifier layer's input recorded (:class:`HeadInputs`; None unless ``features``)."""
    index = {name: i for i, name in enumerate(ckpt.classes)}
    if not features:
        logits, _, targets, files, _ = score_items(ckpt, items, index, batch_size, False)
        return logits, None, targets, files
    with HeadInputs(ckpt.model) as heads:
        logits, _, targets, files, _ = score_items(ckpt, items, index, batch_size, False)
        found = torch.cat(heads.calls) if heads.calls else torch.empty(0, 0)
    return logits, found, targets, files


def add_open_set(
    result: EvalResult,
    rejection: Rejection,
    suggestion: dict | None,
    log: Log,
    evaluated: tuple[Checkpoint, str | os.PathLike | None, int] | None = None,
) -> None:
    """The accepted images' coverage and accuracy, AURC and the risk-coverage curve,
    into ``result`` (``open_set``), its files, and metrics.json. A feature score:
    its features come from the pass that picked the threshold when the same split
    is evaluated, else from one more pass over ``evaluated`` (the checkpoint, the
    data, the batch size), without TTA."""
    assert result.outputs is not None, "evaluate() keeps its outputs for this step"
    logits, tta_logits, targets = result.outputs
    features = None
    again = suggestion.pop("outputs", None) if suggestion is not None else None  # not for the JSON
    if rejection.score in FEATURE_SCORES:
        tta_logits = None
        if again is not None and suggestion is not None and suggestion["split"] == result.data:
            logits, features, targets = again  # the images the threshold was picked on, in that order
        elif evaluated is not None:
            ckpt, data, batch_size = evaluated
            logits, features, targets, _ = feature_pass(ckpt, labelled_items(ckpt, data)[0], batch_size)
        else:
            raise ValueError("a feature score needs the checkpoint and data that were evaluated")
    report = selective_report(logits, targets, rejection, features)
    curve = report.pop("curve")
    if tta_logits is not None:
        tta = selective_report(tta_logits, targets, rejection)
        tta.pop("curve")
        report["tta"] = {k: tta[k] for k in ("accepted", "coverage", "accuracy_accepted", "aurc")}
    if suggestion is not None:
        report["suggested"] = suggestion
        if suggestion["split"] == result.data:
            log("note: evaluated on the split the threshold was picked on: the coverage is the target")
    result.report["open_set"] = report
    interrupts.check()  # before the curve's files
    out_dir = Path(result.out_dir or ".")
    csv_path, png_path = out_dir / "risk_coverage.csv", out_dir / "risk_coverage.png"
    write_text_atomic(csv_path, _curve_csv(curve))
    save_curve_png(png_path, curve, report, f"{result.checkpoint.name} on {result.data}")
    result.files["risk_coverage_csv"] = str(csv_path)
    result.files["risk_coverage_png"] = str(png_path)
    write_metrics_json(result)
    log(
        f"open set: {rejection.describe()} -> unknown; kept {report['accepted']} of {report['images']} "
        f"({report['coverage']:.1%}), accuracy {report['accuracy_accepted']:.4f} on those; "
        f"AURC {report['aurc']:.4f}; wrote {csv_path.name} and {png_path.name}"
    )


def _curve_csv(curve: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["threshold", "coverage", "risk"])
    for t, c, r in zip(curve["threshold"], curve["coverage"], curve["risk"], strict=True):
        writer.writerow([f"{t:.6g}", f"{c:.6f}", f"{r:.6f}"])
    return buf.getvalue()


def save_curve_png(path: Path, curve: dict, report: dict, title: str) -> None:
    """Risk (error rate of the accepted images) against coverage; the threshold marked.
    Matplotlib's object API on the Agg canvas: no pyplot, no global figure state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from imgcls.explain import fit_text

    fig = Figure(figsize=(5.0, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.step(
        [0.0, *curve["coverage"]], [curve["risk"][0] if curve["risk"] else 0.0, *curve["risk"]], where="pre"
    )
    ax.axvline(report["coverage"], color="tab:red", linestyle="--", linewidth=1)
    ax.annotate(
        f"{report['score']} >= {report['threshold']:.3g}: coverage {report['coverage']:.1%}",
        (report["coverage"], 1 - report["accuracy_accepted"] if report["accepted"] else 0.0),
        textcoords="offset points",
        xytext=(-6, 8),
        ha="right",
        fontsize=8,
        color="tab:red",
    )
    ax.set_xlim(0, 1.01)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (share of images accepted)")
    ax.set_ylabel("risk (error rate of the accepted)")
    ax.set_title(fit_text(f"{title}: AURC {report['aurc']:.4f}", 4.6, 9), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def open_set_renderables(result: EvalResult) -> list:
    """The open-set table for people (nothing when it was not asked)."""
    from rich.table import Table
    from rich.text import Text

    r = result.report.get("open_set")
    if r is None:
        return []
    table = Table(
        title=Text(f"unknown: {r['score']} below {r['threshold']:.6g} ({r['source']})"),
        title_justify="left",
        show_header=False,
    )
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    table.add_row("accepted (coverage)", f"{r['accepted']} of {r['images']} ({r['coverage']:.1%})")
    table.add_row("accuracy on the accepted", f"{r['accuracy_accepted']:.4f} (all: {r['accuracy_all']:.4f})")
    table.add_row("AURC", f"{r['aurc']:.4f}")
    others = ", ".join(f"{k} {v:.4f}" for k, v in r["aurc_by_score"].items())
    table.add_row("AURC by score", others)
    if "tta" in r:
        t = r["tta"]
        table.add_row("with TTA: coverage / accuracy", f"{t['coverage']:.1%} / {t['accuracy_accepted']:.4f}")
    return [table]
