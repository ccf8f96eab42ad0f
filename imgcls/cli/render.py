"""What the commands print: pure functions from a result to rows, lines or
rich renderables. No I/O here; a command prints what these return, so the
table, the JSON and the CSV of one result come from the same rows.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable
from typing import Any

from imgcls.text import cell, plain, shown

# --------------------------------------------------------------------------- train


def train_summary(result) -> dict:
    """The train command's result for --json (val_f1 on multi-label runs)."""
    best = result.best
    return {
        "run_dir": str(result.run_dir),
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        **{k: best[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1") if k in best},
        **({"calibration": result.calibration} if getattr(result, "calibration", None) else {}),
    }


def train_closing(summary: dict) -> str:
    """The closing lines; a multi-label run's best epoch was chosen on val_f1, so it leads."""
    text = f"best epoch {summary['best_epoch']}"
    if "val_f1" in summary:
        text += f": val_f1 {summary['val_f1']:.4f}, val_acc (exact match) {summary['val_acc']:.4f}"
        text += f", val_loss {summary['val_loss']:.4f}"
    elif "val_acc" in summary:
        text += f": val_acc {summary['val_acc']:.4f}, val_loss {summary['val_loss']:.4f}"
    if "calibration" in summary:
        from imgcls.calibration import summary_line

        text += f"\n{summary_line(summary['calibration'])}"
    return f"{text}\nrun folder: {summary['run_dir']}"


# --------------------------------------------------------------------------- predict


def prediction_header(task: str, k: int, rejection: bool = False) -> list[str]:
    """The CSV header (without the trailing ``error`` column). ``rejection``
    (``--min-confidence``): the ``unknown`` flag and the ``score`` it was judged by, and
    (single label) the top class, which ``label`` no longer names for an unknown file."""
    if task == "multilabel":
        # the training CSV's own syntax (labels joined by ';'), so output can be corrected and trained on
        return ["file", "labels", "probabilities"] + (["unknown", "score"] if rejection else [])
    return (
        ["file", "label", "confidence", "unsure"]
        + (["unknown", "score", "top_label"] if rejection else [])
        + [col for i in range(2, k + 1) for col in (f"label_{i}", f"p_{i}")]
    )


def prediction_csv_row(record, task: str, k: int, failed: bool, rejection: bool = False) -> list[str]:
    """One CSV row, ``error`` last: a prediction's cells, or a failure's file and error."""
    width = len(prediction_header(task, k, rejection))
    if failed:
        return [plain(record.file), *[""] * (width - 1), plain(record.error)]
    judged = [str(bool(record.unknown)).lower(), f"{record.score:.6f}"] if rejection else []
    if task == "multilabel":
        label = "" if record.unknown else plain(record.label)  # the labels cell stays trainable
        probs = ";".join(f"{p:.6f}" for _, p in record.labels)
        return [plain(record.file), label, probs, *judged, ""]
    if rejection:
        judged.append(plain(record.top_k[0][0]))
    extra = [v for label, p in record.top_k[1:] for v in (plain(label), f"{p:.6f}")]
    extra += [""] * (2 * (k - 1) - len(extra))
    file, label = plain(record.file), plain(record.label)
    return [file, label, f"{record.confidence:.6f}", str(record.unsure).lower(), *judged, *extra, ""]


def predictions_table(rows: list, task: str, k: int):
    """The table people read: one row per predicted file."""
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("file", overflow="fold")
    if task == "multilabel":
        table.add_column("labels (probability)")
        for r in rows:
            labels = ", ".join(f"{shown(label)} {p:.3f}" for label, p in r.labels)
            if r.unknown:
                top = ", ".join(f"{shown(label)} {p:.3f}" for label, p in r.top_k)
                table.add_row(cell(r.file), Text(f"unknown (top: {top})", style="magenta"))
                continue
            table.add_row(cell(r.file), Text(labels) if labels else Text("(none)", style="dim"))
        return table
    table.add_column("label")
    table.add_column("p", justify="right")
    unknowns = any(r.unknown for r in rows)
    if k > 1 or unknowns:
        table.add_column(f"next {k - 1}" if not unknowns else "next (unknown: the top classes)")
    table.add_column("")
    for r in rows:
        # an unknown file: its top class joins the others, so every probability is still shown
        label = Text("unknown", style="magenta") if r.unknown else cell(r.label)
        cells = [cell(r.file), label, f"{r.confidence:.3f}"]
        rest = r.top_k if r.unknown else r.top_k[1:]
        if k > 1 or unknowns:
            cells.append(Text(", ".join(f"{shown(name)} {p:.3f}" for name, p in rest)))
        cells.append("[yellow]unsure[/yellow]" if r.unsure else "")
        table.add_row(*cells)
    return table


# --------------------------------------------------------------------------- cache


def cache_table(entries: list[dict], human_bytes):
    from rich.table import Table

    # at 80 columns every entry stays whole: a short key, the source folded over lines, the date wrapped
    table = Table()
    table.add_column("key", no_wrap=True)
    table.add_column("source", overflow="fold", ratio=1)
    table.add_column("split", overflow="fold")
    for name in ("images", "size"):
        table.add_column(name, no_wrap=True, justify="right")
    table.add_column("last used", min_width=10)
    for e in entries:
        used = datetime.datetime.fromtimestamp(e["last_used"]).strftime("%Y-%m-%d %H:%M")
        table.add_row(
            e["key"][:12],
            cell(e["source"]),
            cell(e["split"]),
            str(e["images"]),
            human_bytes(e["bytes"]),
            used,
        )
    return table


# --------------------------------------------------------------------------- export


def export_lines(result) -> list[str]:
    checks = result.checks
    details = [result.exporter]
    if result.opset is not None:
        details.append(f"opset {result.opset}")
    if result.format != "safetensors":
        details.append("dynamic batch" if result.dynamic_batch else f"batch {result.batch_size}")
    lines = [
        f"wrote {result.path} ({', '.join(details)})",
        f"{'its float32 graph matches' if result.quantization else 'matches'} PyTorch on "
        f"{checks[0].images} images at batch size "
        f"{' and '.join(str(c.batch_size) for c in checks)}: "
        f"max |logit diff| {max(c.max_logit_diff for c in checks):.2g}, "
        f"max |prob diff| {max(c.max_prob_diff for c in checks):.2g}",
    ]
    q = result.quantization
    if q:
        gate = q["gate"]
        lines.append(
            f"int8 ({q['format']}, {q['weights']} weights, {'/'.join(q['ops'])}), calibrated on "
            f"{q['calibration_images']} training images"
        )
        lines.append(
            f"int8 gate on {gate['images']} {gate['split']} images: {gate['metric']} "
            f"{gate['fp32']:.2%} fp32 -> {gate['int8']:.2%} int8 ({-gate['drop']:+.2f} points, "
            f"allowed -{gate['max_drop']:g}); agrees with fp32 on {gate['agreement']:.2%}"
            + (" (kept by --force)" if gate["forced"] else "")
        )
    return lines


# --------------------------------------------------------------------------- explain


def explain_lines(result) -> list[str]:
    lines = [f"{result.method} at layer {result.layer}; pictures in {result.out_dir}"]
    for e in result.images:
        for t in e.targets:
            peak = t["peak"]
            lines.append(
                f"{e.file}: predicted {e.predicted or '(no label)'} ({e.probability:.3f}); {t['class']}: "
                f"peak at x={peak['x']} y={peak['y']}, {t['area_above_half_max']:.1%} of the frame "
                f"above half max -> {t['overlay']}"
            )
        if e.maps:
            lines.append(f"{e.file}: feature maps -> {e.maps}")
    if result.filters:
        lines.append(f"first-layer filters -> {result.filters}")
    return lines


# --------------------------------------------------------------------------- tune


def short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def trials_table(result):
    from rich.table import Table
    from rich.text import Text

    # the study name, the space's keys and choices are the user's: data, not markup
    keys = sorted({k for t in result.trials for k in t.params})
    title = f"study {shown(result.study)}: {result.metric} ({result.direction})"
    table = Table(title=Text(title, style="table.title"))
    for col in ("trial", "state", result.metric, "epochs", "seconds", *keys):
        table.add_column(cell(col), justify="left" if col == "state" else "right")
    for t in result.trials:
        table.add_row(
            str(t.number),
            t.state,
            "-" if t.value is None else f"{t.value:.4f}",
            str(t.epochs),
            "-" if t.seconds is None else f"{t.seconds:.1f}",
            *("-" if t.params.get(k) is None else cell(short(t.params[k])) for k in keys),
        )
    return table


def tune_lines(result) -> list[str]:
    lines = []
    if result.best is not None:
        lines.append(
            f"best: trial {result.best.number}, {result.metric} {result.best.value:.4f}, "
            f"run {shown(result.best.run_dir)}"
        )
    for label, path in (("best recipe", result.best_yaml), ("importance", result.importance_png)):
        if path is not None:
            lines.append(f"{label}: {shown(path)}")
    return lines


# --------------------------------------------------------------------------- runs


def runs_table(rows: list[dict], columns: list[str], fmt, problems: bool = False):
    """One row per run; with ``problems``, a last column counting each run's unreadable files."""
    from rich.table import Table

    table = Table()
    for col in [*columns, "problems"] if problems else columns:
        left = col in ("run", "date", "arch", "device", "precision", "problems")
        table.add_column(col, justify="left" if left else "right")
    for r in rows:
        cells = [fmt(c, r[c]) for c in columns]
        if problems:
            n = len(r["problems"])
            cells.append(f"{n} unreadable file{'s' if n > 1 else ''}" if n else "")
        table.add_row(*(cell(c) for c in cells))
    return table


def diff_rows(result: dict) -> Iterable[list]:
    """``--diff --csv``: section, key, a, b."""
    for r in result["recipe"]:
        yield ["recipe", r["key"], r["a"], r["b"]]
    for r in result["metrics"]:
        yield ["metric", r["metric"], r["a"], r["b"]]


def diff_renderables(result: dict, a: str, b: str, fmt) -> list:
    """The recipe differences (or "identical") and the metrics, side by side."""
    from rich.table import Table

    out: list = []
    table = Table(title="recipe")
    for col in ("key", a, b):
        table.add_column(cell(col), overflow="fold")
    for r in result["recipe"]:
        table.add_row(
            cell(r["key"]), "-" if r["a"] is None else cell(r["a"]), "-" if r["b"] is None else cell(r["b"])
        )
    out.append(table if result["recipe"] else "recipes: identical")
    table = Table(title="metrics")
    for col in ("metric", a, b):
        table.add_column(cell(col), justify="left" if col == "metric" else "right")
    for r in result["metrics"]:
        table.add_row(cell(r["metric"]), fmt(r["metric"], r["a"]), fmt(r["metric"], r["b"]))
    out.append(table)
    return out
