"""Metrics of a trained checkpoint over labelled images.

Which images: by default the run's own held-out split, rebuilt from the
recipe inside the checkpoint (its test split when it has one, else val).
Given DATA, all of it: a folder of class folders (or its ``test/`` or ``val/``
sub-tree when there is one), or a CSV of ``file,label[,split]`` rows (every
row; paths relative to the CSV).

Class names are matched by name, so data with a subset of the model's
classes is fine; a class the model does not know is an error. Unreadable
images are skipped with a warning and counted, as in training; the report
covers the others, and :meth:`EvalResult.raise_if_skipped` then makes it a
partial failure (exit 3). None readable is a :class:`DataError` (exit 2).

Writes ``confusion.png`` and ``metrics.json`` into the output folder
(default ``<run>/eval/``, or ``<checkpoint stem>-eval/`` beside a loose
checkpoint), and optionally a CSV of the misclassified files.

Multi-label checkpoints (``task: multilabel``): labels are sets (a CSV's
``dog;cat``; a class folder gives a set of one), each class is decided by its
sigmoid probability against its threshold, and the report holds per-class
precision / recall / F1 / AP, micro and macro F1, mAP and the exact-match
ratio (also under ``accuracy``: scikit-learn's subset accuracy). No confusion
matrix: with several labels per image there is no single "predicted as".
Thresholds tuned on the run's validation split (:mod:`imgcls.thresholds`)
are passed in as ``tuned``.

``tta``: the metrics are computed twice, on the plain logits and on the
logits averaged with the flipped image (:func:`imgcls.forward.tta_logits`);
the report keeps the plain numbers and adds the TTA ones under ``tta``.

Probabilities and the loss are calibrated (logits / the stored temperature);
``calibration`` and ``reliability.png``: before and after (:mod:`imgcls.calibration`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgcls import interrupts
from imgcls.calibration import calibration_report, calibration_table, reliability_png, scale
from imgcls.checkpoint import Checkpoint, load_checkpoint
from imgcls.data.inputs import decoded_batches
from imgcls.data.sources import read_labelled_rows, scan_class_folders
from imgcls.errors import DataError, PartialFailure
from imgcls.forward import logits, model_input, tta_logits
from imgcls.io import atomic_path, write_text_atomic
from imgcls.metadata import task_of, temperature_of, thresholds_of
from imgcls.metrics import (
    classification_report,
    multilabel_decisions,
    multilabel_report,
)

Log = Callable[[str], None]
Items = list[tuple[Any, Any]]  # (file, class name; or a tuple of label names, multi-label)
MAX_LOGGED_BAD = 10
MATRIX_TABLE_LIMIT = 20  # larger confusion matrices go to the PNG only


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TunedThresholds:
    """Per-class thresholds picked on the run's validation split (:mod:`imgcls.thresholds`)."""

    values: list[float]
    path: Path  # the checkpoint copy that carries them
    split: str  # where they were tuned, in words (as EvalResult.data says it)


FILES = ("tuned_checkpoint", "confusion_png", "errors_png", "misclassified_csv", "metrics_json")


def _file_order(kind: str) -> int:
    """The written files in the order the steps write them, whichever step adds one."""
    return FILES.index(kind) if kind in FILES else len(FILES)


@dataclass
class EvalResult:
    checkpoint: Path
    data: str  # what was evaluated, in words
    report: dict  # imgcls.metrics.classification_report
    misclassified: list[dict] = field(default_factory=list)  # file, true, predicted, confidence
    bad: list[tuple[Path, str]] = field(default_factory=list)
    out_dir: Path | None = None
    files: dict[str, str] = field(default_factory=dict)  # what was written: kind -> path
    # (logits, TTA logits or None, targets) of the images read, for later steps (imgcls.rejection)
    outputs: tuple | None = field(default=None, repr=False)

    def to_dict(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "data": self.data,
            **self.report,
            "skipped": len(self.bad),
            "misclassified": len(self.misclassified),
            "files": {k: self.files[k] for k in sorted(self.files, key=_file_order)},
        }

    def raise_if_skipped(self) -> None:
        """:class:`PartialFailure` (exit 3) when some images could not be read.

        Call it after the report is out: the metrics cover the readable images.
        """
        if self.bad:
            total = self.report["samples"] + len(self.bad)
            raise PartialFailure(
                f"{len(self.bad)} of {total} images could not be read and were skipped "
                f"(the metrics cover the other {self.report['samples']})"
            )


def evaluate(
    target: str | os.PathLike | Checkpoint,
    data: str | os.PathLike | None = None,
    *,
    top_k: int = 5,
    batch_size: int = 128,
    out: Path | None = None,
    misclassified: Path | None = None,
    log: Log = _stderr,
    tta: bool = False,
    tuned: TunedThresholds | None = None,
) -> EvalResult:
    """The metrics of the checkpoint ``target`` (file, run folder, or loaded) on ``data``.

    Writes ``metrics.json`` and (single label) ``confusion.png`` into the
    output folder, and the misclassified CSV when asked. ``tuned``: evaluate
    a multi-label model at thresholds :func:`imgcls.thresholds.tune_thresholds`
    picked (the error gallery and the report are later steps: see
    :mod:`imgcls.cli.evaluate`)."""
    ckpt = target if isinstance(target, Checkpoint) else load_checkpoint(target)
    multilabel = task_of(ckpt.meta) == "multilabel"
    items, where = labelled_items(ckpt, data)
    several = next((label for _, label in items if isinstance(label, tuple)), None)
    if several is not None and not multilabel:
        rows = f"rows with several labels ('{';'.join(several)}')" if several else "rows with no label"
        raise DataError(
            f"{where}: {rows} but {ckpt.path} is a "
            "single-label model; evaluate it on data with one label per image"
        )
    index = class_index(ckpt.classes, {n for _, label in items for n in _names(label)}, where)
    thresholds = thresholds_of(ckpt.meta) if multilabel else None
    if tuned is not None:
        thresholds = tuned.values
        if where == tuned.split:
            log("note: evaluated on the split the thresholds were tuned on: the numbers are optimistic")
    log(f"evaluating {ckpt.path} on {where}: {len(items)} images" + (" (and with TTA)" if tta else ""))
    _log_counts(ckpt.classes, items, log)
    scores, tta_scores, targets, files, bad = score_items(ckpt, items, index, batch_size, multilabel, tta)
    for path, reason in bad[:MAX_LOGGED_BAD]:
        log(f"warning: skipped {path}: {reason}")
    if len(bad) > MAX_LOGGED_BAD:
        log(f"warning: skipped {len(bad) - MAX_LOGGED_BAD} more unreadable images")
    if not files:
        raise DataError(f"{where}: none of the {len(items)} images could be read")
    raw, temperature = scores, temperature_of(ckpt.meta)  # every probability below is calibrated
    scores, tta_scores = scale(raw, temperature), None if tta_scores is None else scale(tta_scores, temperature)
    if multilabel:
        report = multilabel_report(torch.sigmoid(scores), targets, ckpt.classes, thresholds)
        wrong = _multilabel_mistakes(torch.sigmoid(scores), targets, files, ckpt.classes, thresholds)
    else:
        report = classification_report(scores, targets, ckpt.classes, top_k=top_k)
        wrong = _mistakes(scores, targets, files, ckpt.classes)
    if tta_scores is not None:
        report["tta"] = tta_summary(tta_scores, targets, ckpt.classes, top_k, thresholds)
    report["calibration"] = calibration_report(raw, targets, multilabel, temperature)
    result = EvalResult(ckpt.path, where, report, wrong, bad, outputs=(scores, tta_scores, targets))
    interrupts.check()  # before the first file of the evaluation is written
    if tuned is not None:
        result.files["tuned_checkpoint"] = str(tuned.path)
    result.out_dir = out_dir = Path(out) if out is not None else default_out_dir(ckpt)
    if not multilabel:
        png = out_dir / "confusion.png"
        save_confusion_png(png, report["confusion"], ckpt.classes, f"{ckpt.path.name} on {where}")
        result.files["confusion_png"] = str(png)
    result.files["reliability_png"] = reliability_png(out_dir, report["calibration"], ckpt.path, where)
    if misclassified is not None:
        write_misclassified(Path(misclassified), wrong)
        result.files["misclassified_csv"] = str(misclassified)
    write_metrics_json(result)
    png_path = result.files.get("confusion_png")
    metrics_json = out_dir / "metrics.json"
    log(f"wrote {png_path} and {metrics_json.name}" if png_path else f"wrote {metrics_json}")
    return result


def write_metrics_json(result: EvalResult) -> None:
    """``metrics.json`` in the output folder: what ``--json`` prints (written
    again by a later step that adds a file, so it lists every file written)."""
    metrics_json = Path(result.out_dir or ".") / "metrics.json"
    result.files["metrics_json"] = str(metrics_json)
    interrupts.check()
    write_text_atomic(metrics_json, json.dumps(result.to_dict(), indent=2) + "\n")


def _log_counts(classes: list[str], items: Items, log: Log) -> None:
    from imgcls.imbalance import count_lines

    counted = {c: 0 for c in classes}
    for _, label in items:
        for name in _names(label):
            counted[name] += 1
    shown = [c for c in classes if counted[c]]
    for line in count_lines("evaluated", shown, [counted[c] for c in shown]):
        log(line)


def _mistakes(scores: torch.Tensor, targets: torch.Tensor, files, classes: list[str]) -> list[dict]:
    """Images whose top class is not the true one, with the top class's probability."""
    conf, pred = torch.softmax(scores, dim=1).max(1)
    return [
        {
            "file": str(files[i]),
            "true": classes[int(targets[i])],
            "predicted": classes[int(pred[i])],
            "confidence": float(conf[i]),
        }
        for i in torch.nonzero(pred != targets).flatten().tolist()
    ]


def _names(label: str | tuple[str, ...]) -> tuple[str, ...]:
    return label if isinstance(label, tuple) else (label,)


def tta_summary(scores: torch.Tensor, targets: torch.Tensor, classes, top_k: int, thresholds) -> dict:
    """The headline metrics of the TTA logits (what evaluate shows next to the plain ones)."""
    if thresholds is not None:
        full = multilabel_report(torch.sigmoid(scores), targets, classes, thresholds)
        keys = ("accuracy", "exact_match", "micro_f1", "macro_f1", "mAP", "loss")
        return {k: full[k] for k in keys}
    full = classification_report(scores, targets, classes, top_k=top_k)
    return {
        "accuracy": full["accuracy"],
        "balanced_accuracy": full["balanced_accuracy"],
        "top_k_accuracy": full["top_k_accuracy"],
        "loss": full["loss"],
        "macro_f1": full["macro"]["f1"],
    }


def _multilabel_mistakes(probs, targets, files, classes, thresholds) -> list[dict]:
    """Images whose set of labels is not exactly right: true and predicted as ``a;b``."""
    pred = multilabel_decisions(probs, thresholds)
    truth = targets.bool()
    out = []
    for i in torch.nonzero((pred != truth).any(1)).flatten().tolist():
        on = torch.nonzero(pred[i]).flatten().tolist()
        out.append(
            {
                "file": str(files[i]),
                "true": ";".join(classes[k] for k in torch.nonzero(truth[i]).flatten().tolist()),
                "predicted": ";".join(classes[k] for k in on),
                "confidence": float(probs[i, on].max()) if on else 0.0,
            }
        )
    return out


def default_out_dir(ckpt: Checkpoint) -> Path:
    if ckpt.run_dir is not None:
        return ckpt.run_dir / "eval"
    return ckpt.path.parent / f"{ckpt.path.stem}-eval"


@torch.inference_mode()
def score_items(
    ckpt: Checkpoint,
    items: Items,
    index: dict[str, int],
    batch_size: int,
    multilabel: bool,
    tta: bool = False,
):
    """(logits, TTA logits or None, targets, files read, unreadable) over ``items``.

    Targets: class indices, or multi-hot float rows for a multi-label model."""
    paths = [p for p, _ in items]
    n = len(ckpt.classes)
    outputs: list[torch.Tensor] = []
    tta_outputs: list[torch.Tensor] = []
    targets: list = []  # class indices, or multi-hot rows
    files: list[Path] = []
    bad: list[tuple[Path, str]] = []
    done = 0
    for results in decoded_batches(paths, ckpt.preprocessing, batch_size):
        interrupts.check()  # between batches
        batch_items = items[done : done + len(results)]
        done += len(results)
        good = []
        for (path, label), r in zip(batch_items, results, strict=True):
            if isinstance(r, torch.Tensor):
                good.append(r)
                if multilabel:
                    hot = [0.0] * n
                    for name in _names(label):
                        hot[index[name]] = 1.0
                    targets.append(hot)
                else:
                    targets.append(index[label])
                files.append(path)
            else:
                bad.append((path, r.reason))
        if good:
            pre = ckpt.preprocessing
            x = model_input(torch.stack(good), pre["mean"], pre["std"])
            outputs.append(logits(ckpt.model, x))
            if tta:
                tta_outputs.append(tta_logits(ckpt.model, x))
    scores = torch.cat(outputs) if outputs else torch.empty(0, n)
    tta_scores = (torch.cat(tta_outputs) if tta_outputs else torch.empty(0, n)) if tta else None
    if multilabel:
        target = torch.tensor(targets, dtype=torch.float32).reshape(-1, n)
    else:
        target = torch.tensor(targets, dtype=torch.int64)
    return scores, tta_scores, target, files, bad


# --------------------------------------------------------------------------- which images


def labelled_items(ckpt: Checkpoint, data: str | os.PathLike | None) -> tuple[Items, str]:
    """(file, class name) pairs to evaluate, and a description of where from."""
    if data is None:
        return run_split(ckpt)
    path = Path(data).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return read_labels_csv(path), str(path)
    if path.is_dir():
        return read_labelled_folder(path)
    if path.exists():
        raise DataError(f"{path}: not a folder or a .csv file")
    raise DataError(f"{path}: no such folder or CSV file")


def run_split(ckpt: Checkpoint, split: str | None = None) -> tuple[Items, str]:
    """The run's held-out images: its test split when it has one, else val (or ``split``)."""
    from imgcls.data.sources import open_source

    spec = ckpt.recipe.data
    base = ckpt.run_dir or ckpt.path.parent
    source = open_source(spec, base)
    if split is None:
        split = "test" if source.test else "val"
    items = source.test if split == "test" else source.val
    if not items:
        raise DataError(
            f"{ckpt.path}: the run has no validation or test split (data.val_split is 0); "
            "give the images to evaluate: imgcls evaluate RUN DATA"
        )
    where = f"the run's {split} split ({source.root})"
    if source.task == "multilabel":
        named = [(p, tuple(c for c, bit in zip(source.classes, hot, strict=True) if bit)) for p, hot in items]
        return named, where
    return [(p, source.classes[label]) for p, label in items], where


def read_labelled_folder(root: Path) -> tuple[Items, str]:
    """Class folders under ``root``, or under its test/ (else val/) sub-tree."""
    for name in ("test", "val", "valid", "validation"):
        if (root / name).is_dir():
            root = root / name
            break
    else:
        if (root / "train").is_dir():
            raise DataError(
                f"{root}: has train/ but no test/ or val/; point evaluate at the folder to evaluate"
            )
    classes, found = scan_class_folders(root, for_training=False)
    if not found:
        raise DataError(f"{root}: no images in its class folders")
    return [(path, classes[label]) for path, label in found], str(root)


def read_labels_csv(path: Path) -> Items:
    """Every ``file,label[,split]`` row (the split is ignored: every row counts).
    A label cell with several labels (``dog;cat``) gives a tuple of names, an
    empty one (multi-label: no positive label) an empty tuple.

    A listed file that is missing is not an error here: it is skipped and
    counted like an unreadable one.
    """
    rows = read_labelled_rows(path, must_exist=False)
    return [(row.path, row.labels if len(row.labels) != 1 else row.label) for row in rows]


def class_index(model_classes: list[str], data_classes: set[str], where: str) -> dict[str, int]:
    """Data class name -> model class index; an unknown class is an error naming it."""
    index = {name: i for i, name in enumerate(model_classes)}
    unknown = sorted(data_classes - set(index))
    if unknown:
        listed = ", ".join(f"'{c}'" for c in unknown)
        raise DataError(
            f"{where}: class {listed} is not one of the model's classes "
            f"({', '.join(model_classes)}); evaluate needs the same class names "
            "(a subset is fine)"
        )
    return index


# --------------------------------------------------------------------------- outputs


def write_misclassified(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["file", "true", "predicted", "confidence"])
    for r in rows:
        writer.writerow([r["file"], r["true"], r["predicted"], f"{r['confidence']:.6f}"])
    write_text_atomic(path, buf.getvalue())


def save_confusion_png(path: Path, cm: list[list[int]], classes: list[str], title: str) -> None:
    """The confusion matrix as a heat map (colour: share of the true class; text: counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = torch.tensor(cm, dtype=torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    n = len(classes)
    side = min(max(4.0, 0.45 * n + 2.5), 40.0)
    fig, ax = plt.subplots(figsize=(side, side))
    try:
        ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
        ticks = range(n)
        fontsize = 8 if n <= 30 else 5
        ax.set_xticks(ticks, classes, rotation=90, fontsize=fontsize)
        ax.set_yticks(ticks, classes, fontsize=fontsize)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        from imgcls.explain import fit_text

        ax.set_title(fit_text(title, side - 0.4, 9), fontsize=9)
        if n <= 30:
            for t in range(n):
                for p in range(n):
                    if counts[t, p]:
                        color = "white" if shares[t, p] > 0.5 else "black"
                        ax.text(
                            p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=7, color=color
                        )
        fig.tight_layout()
        with atomic_path(path) as tmp:  # tight: whatever the wrapping missed is not cut off
            fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight", pad_inches=0.05)
    finally:
        plt.close(fig)


def report_renderables(result: EvalResult) -> list:
    """Rich tables for people: summary, per class, confusion matrix, top confusions.
    Class names and paths are data: shown as :func:`imgcls.text.cell`, never read as markup."""
    from rich.table import Table

    from imgcls.text import cell

    r = result.report
    if r.get("task") == "multilabel":
        return _multilabel_renderables(result)
    out: list = []
    tta = r.get("tta")
    summary = _summary_table(result, "")
    for key, name in (
        ("accuracy", "accuracy"),
        ("top_k_accuracy", f"top-{r['top_k']} accuracy"),
        ("loss", "loss"),
        ("balanced_accuracy", "balanced accuracy"),
    ):
        _metric_row(summary, name, key, r, tta)
    for kind in ("macro", "weighted"):
        a = r[kind]
        extra = [f"F1 {tta['macro_f1']:.4f}"] if tta and kind == "macro" else ([""] if tta else [])
        summary.add_row(
            f"{kind} P / R / F1", f"{a['precision']:.4f} / {a['recall']:.4f} / {a['f1']:.4f}", *extra
        )
    out.append(summary)

    per = Table(title="per class", title_justify="left")
    per.add_column("class")
    for col in ("precision", "recall", "f1", "support"):
        per.add_column(col, justify="right")
    for row in r["per_class"]:
        per.add_row(
            cell(row["class"]),
            f"{row['precision']:.4f}",
            f"{row['recall']:.4f}",
            f"{row['f1']:.4f}",
            str(row["support"]),
        )
    out.append(per)

    classes = r["classes"]
    if len(classes) <= MATRIX_TABLE_LIMIT:
        cm = Table(title="confusion (rows: true, columns: predicted)", title_justify="left")
        cm.add_column("")
        for name in classes:
            cm.add_column(cell(name), justify="right")
        for i, (name, row) in enumerate(zip(classes, r["confusion"], strict=True)):
            cells = [f"[bold]{v}[/bold]" if i == j else (str(v) if v else "·") for j, v in enumerate(row)]
            cm.add_row(cell(name), *cells)
        out.append(cm)

    if r["confused_pairs"]:
        pairs = Table(title="most confused (true → predicted)", title_justify="left")
        for col in ("true", "predicted", "count", "share of true"):
            pairs.add_column(col, justify="left" if col in ("true", "predicted") else "right")
        for p in r["confused_pairs"]:
            pairs.add_row(cell(p["true"]), cell(p["predicted"]), str(p["count"]), f"{p['share']:.1%}")
        out.append(pairs)
    return [*out, calibration_table(r["calibration"])] if "calibration" in r else out


def _summary_table(result: EvalResult, kind: str):
    """The headline table: a ``plain`` column, a ``with TTA`` one when TTA ran, and the image count."""
    from rich.table import Table
    from rich.text import Text

    from imgcls.text import shown

    r, tta = result.report, result.report.get("tta")
    summary = Table(
        title=Text(f"{shown(result.checkpoint)} on {shown(result.data)}{kind}", style="table.title"),
        title_justify="left",
        show_header=bool(tta),
    )
    summary.add_column("", style="bold")
    summary.add_column("plain", justify="right")
    if tta:
        summary.add_column("with TTA (flip)", justify="right")
    images = str(r["samples"]) + (f" ({len(result.bad)} unreadable, skipped)" if result.bad else "")
    summary.add_row("images", images, *([images] if tta else []))
    return summary


def _metric_row(summary, name: str, key: str, r: dict, tta: dict | None) -> None:
    """One metric, plain and (when TTA ran) with TTA; absent metrics are left out."""
    if key in r:
        summary.add_row(name, f"{r[key]:.4f}", *([f"{tta[key]:.4f}"] if tta else []))


def _multilabel_renderables(result: EvalResult) -> list:
    from rich.table import Table

    from imgcls.text import cell

    r = result.report
    tta = r.get("tta")
    summary = _summary_table(result, " (multi-label)")
    for key, name in (
        ("exact_match", "exact match"),
        ("micro_f1", "micro F1"),
        ("macro_f1", "macro F1"),
        ("mAP", "mAP"),
        ("loss", "loss (BCE)"),
    ):
        _metric_row(summary, name, key, r, tta)
    per = Table(title="per class (a label is on at probability >= threshold)", title_justify="left")
    per.add_column("class")
    for col in ("threshold", "precision", "recall", "f1", "AP", "support"):
        per.add_column(col, justify="right")
    for row in r["per_class"]:
        per.add_row(
            cell(row["class"]),
            f"{row['threshold']:.3f}",
            f"{row['precision']:.4f}",
            f"{row['recall']:.4f}",
            f"{row['f1']:.4f}",
            "-" if row["ap"] is None else f"{row['ap']:.4f}",
            str(row["support"]),
        )
    return [summary, per, *([calibration_table(r["calibration"])] if "calibration" in r else [])]
