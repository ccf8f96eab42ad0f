"""The table of runs: every run folder under a root, read back from its files.

A run folder is any folder holding ``recipe.yaml`` and ``metrics.csv``
(``runs/<name>/<n>/``, tune trials ``runs/<study>/<trial>/``). Read from it:
recipe.yaml (architecture), metrics.csv (epochs, time, img/s, best val
metrics), summary.json (parameters), best.safetensors metadata (the best
epoch), run.json (device, precision) and eval/metrics.json (test accuracy,
once ``imgcls evaluate`` has run). A missing or unreadable file leaves its
columns empty; it never hides the run.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from imgcls.errors import UsageError

COLUMNS = [
    "run",
    "date",
    "arch",
    "params",
    "epochs",
    "best_epoch",
    "val_acc",
    "val_loss",
    "test_acc",
    "seconds",
    "img_per_s",
    "device",
    "precision",
]
# sort direction for --sort: higher is better for these, lower for the rest; date newest first
DESCENDING = {"date", "val_acc", "test_acc", "img_per_s", "params", "epochs", "best_epoch"}


@dataclass
class RunInfo:
    path: Path
    row: dict[str, Any]
    recipe: dict = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_run(path: Path, root: Path | None = None) -> RunInfo:
    """One run folder as a row of COLUMNS (None where a file is missing)."""
    recipe: dict = {}
    try:
        recipe = yaml.safe_load((path / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        pass
    model = recipe.get("model", {}) if isinstance(recipe, dict) else {}
    if model.get("arch"):
        arch = model["arch"]
    elif model.get("layers") is not None:
        arch = f"layers ({len(model['layers'])})"
    else:
        arch = None

    history: list[dict] = []
    try:
        with open(path / "metrics.csv", newline="", encoding="utf-8") as f:
            history = [{k: _float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    except OSError:
        pass
    best_row: dict = {}
    best_epoch = None
    if (path / "best.safetensors").exists():
        from imgcls.checkpoint import read_meta
        from imgcls.errors import CheckpointError

        try:
            meta = read_meta(path / "best.safetensors")
            best_row, best_epoch = meta.get("metrics") or {}, meta.get("epoch")
        except CheckpointError:
            pass
    if not best_row and history:  # no checkpoint: the best validation epoch
        with_val = [h for h in history if h.get("val_acc") is not None]
        if with_val:
            best_row = max(with_val, key=lambda h: h["val_acc"])
            best_epoch = int(best_row["epoch"])
    summary = _read_json(path / "summary.json")
    info = _read_json(path / "run.json")
    evaluation = _read_json(path / "eval" / "metrics.json")
    seconds = sum(h.get("seconds") or 0 for h in history) if history else None
    rates = [h["img_per_s"] for h in history if h.get("img_per_s")]
    stamp = path / "recipe.yaml"
    date = (
        datetime.fromtimestamp(stamp.stat().st_mtime).strftime("%Y-%m-%d %H:%M") if stamp.exists() else None
    )
    name = str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)
    row = {
        "run": name,
        "date": date,
        "arch": arch,
        "params": summary.get("total_params"),
        "epochs": len(history),
        "best_epoch": best_epoch,
        "val_acc": best_row.get("val_acc"),
        "val_loss": best_row.get("val_loss"),
        "test_acc": evaluation.get("accuracy"),
        "seconds": round(seconds, 1) if seconds is not None else None,
        "img_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "device": info.get("device"),
        "precision": info.get("precision"),
    }
    return RunInfo(path, row, recipe if isinstance(recipe, dict) else {})


def find_runs(root: Path) -> list[Path]:
    if not root.exists():
        raise UsageError(f"{root}: no such folder (train something first, or give the runs folder)")
    if (root / "recipe.yaml").exists():
        return [root]
    return sorted(
        (p.parent for p in root.rglob("metrics.csv") if (p.parent / "recipe.yaml").exists()),
        key=lambda p: [int(s) if s.isdigit() else s for s in p.relative_to(root).parts],
    )


def list_runs(root: Path = Path("runs"), sort: str | None = None) -> list[dict]:
    """Every run under ``root`` as a row; ``sort`` by a column (best first)."""
    if sort is not None and sort not in COLUMNS:
        import difflib

        close = difflib.get_close_matches(sort, COLUMNS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(f"--sort {sort}: unknown column{hint} (choose from: {', '.join(COLUMNS)})")
    rows = [read_run(p, root).row for p in find_runs(root)]
    if sort is not None:
        present = [r for r in rows if r[sort] is not None]
        missing = [r for r in rows if r[sort] is None]
        present.sort(key=lambda r: r[sort], reverse=sort in DESCENDING)
        rows = present + missing  # runs without the value last, whatever the order
    return rows


def _flatten(data: Any) -> dict[str, Any]:
    from imgcls.tracking import flatten

    return flatten(data)


def diff_runs(a: Path, b: Path) -> dict:
    """Recipe keys that differ (flattened dotted paths) and the metrics side by side."""
    for p in (a, b):
        if not (p / "recipe.yaml").exists():
            raise UsageError(f"{p}: not a run folder (no recipe.yaml)")
    run_a, run_b = read_run(a), read_run(b)
    flat_a, flat_b = _flatten(run_a.recipe), _flatten(run_b.recipe)
    recipe = [
        {"key": k, "a": flat_a.get(k), "b": flat_b.get(k)}
        for k in [*flat_a, *(k for k in flat_b if k not in flat_a)]
        if flat_a.get(k) != flat_b.get(k)
    ]
    metrics = [{"metric": c, "a": run_a.row[c], "b": run_b.row[c]} for c in COLUMNS if c not in ("run",)]
    return {"a": str(a), "b": str(b), "recipe": recipe, "metrics": metrics}


def fmt(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("val_acc", "val_loss", "test_acc") or isinstance(value, float):
        return f"{value:.4f}" if column in ("val_acc", "val_loss", "test_acc") else f"{value:g}"
    if column == "params":
        return f"{value:,}"
    return str(value)
