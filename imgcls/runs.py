"""The table of runs: every run folder under a root, read back from its files.

A run folder is any folder holding ``recipe.yaml`` and ``metrics.csv``
(``runs/<name>/<n>/``, tune trials ``runs/<study>/<trial>/``, the folds of
``imgcls cv`` ``runs/<name>/cv-<n>/fold-<i>/``: those are listed below one row
for their cross-validation, its folds' means, see :func:`read_cv`). Read from it:
recipe.yaml (architecture), metrics.csv (epochs, wall time, img/s, best val
metrics), summary.json (parameters), best.safetensors metadata (the best
epoch), run.json (device, precision) and eval/metrics.json (test accuracy,
once ``imgcls evaluate`` has run). A missing file leaves its columns empty; a
file that is there but cannot be read (not UTF-8, not JSON / YAML / CSV, a
value that is not a number) leaves its columns empty too and is one line in
the run's ``problems`` (file and line): it never hides the run, nor the others.
"""

from __future__ import annotations

import csv
import io
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
    problems: list[str] = field(default_factory=list)  # one line per unreadable file


class RunFileError(UsageError):
    """A run file that is there but cannot be read: ``path[:line]: reason``."""


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise RunFileError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise RunFileError(f"{path}:{line}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def read_json_file(path: Path) -> dict | None:
    """The JSON object in ``path``, None when there is no such file;
    :class:`RunFileError` naming the file and line when it cannot be read."""
    data = _read_bytes(path)
    if data is None:
        return None
    try:
        doc = json.loads(_utf8(path, data))
    except json.JSONDecodeError as exc:
        raise RunFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise RunFileError(f"{path}:1: not a JSON object (a {type(doc).__name__})")
    return doc


def read_recipe_file(path: Path) -> tuple[str, dict] | None:
    """A run's recipe.yaml as (text, mapping), None when there is none."""
    data = _read_bytes(path)
    if data is None:
        return None
    text = _utf8(path, data)
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RunFileError(f"{where}: not valid YAML ({reason})") from None
    if recipe is None:
        recipe = {}
    if not isinstance(recipe, dict):
        raise RunFileError(f"{path}:1: not a mapping of recipe keys (a {type(recipe).__name__})")
    return text, recipe


def read_metrics_file(path: Path) -> list[dict[str, str]] | None:
    """metrics.csv's rows as text, each value checked to be a number (or
    empty); None when there is no such file. A bad value names its line."""
    data = _read_bytes(path)
    if data is None:
        return None
    reader = csv.DictReader(io.StringIO(_utf8(path, data), newline=""))
    rows = []
    try:
        if reader.fieldnames is None:
            return []
        if "epoch" not in reader.fieldnames:
            raise RunFileError(f"{path}:1: no 'epoch' column in the header (not a metrics.csv imgcls wrote)")
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if None in row:
                raise RunFileError(f"{where}: more cells than the header has columns")
            for key, value in row.items():
                if value is None:
                    raise RunFileError(f"{where}: fewer cells than the header has columns")
                if value and _float(value) is None:
                    raise RunFileError(f"{where}: {key}: {value!r} is not a number")
            if _float(row["epoch"]) is None:
                raise RunFileError(f"{where}: epoch: empty")
            rows.append(row)
    except csv.Error as exc:
        raise RunFileError(f"{path}:{reader.line_num}: cannot parse CSV: {exc}") from None
    return rows


def _read_json(path: Path, problems: list[str]) -> dict:
    try:
        return read_json_file(path) or {}
    except RunFileError as exc:
        problems.append(str(exc))
        return {}


def _value(doc: dict, key: str, path: Path, problems: list[str], kind: type | tuple = (int, float)):
    """``doc[key]`` when it is of ``kind`` (numbers: not bool), None when absent;
    anything else is a problem naming the file and key."""
    value = doc.get(key)
    if value is None or (isinstance(value, kind) and not isinstance(value, bool)):
        return value
    names: dict[Any, str] = {int: "a whole number", str: "text"}
    what = names.get(kind, "a number")
    problems.append(f"{path}: {key}: {value!r} is not {what}")
    return None


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_run(path: Path, root: Path | None = None) -> RunInfo:
    """One run folder as a row of COLUMNS (None where a file is missing or
    unreadable; each unreadable file is one line in ``problems``)."""
    problems: list[str] = []
    recipe: dict = {}
    try:
        recipe = (read_recipe_file(path / "recipe.yaml") or ("", {}))[1]
    except RunFileError as exc:
        problems.append(str(exc))
    history: list[dict] = []
    epochs: int | None = None
    try:
        rows = read_metrics_file(path / "metrics.csv") or []
        history = [{k: _float(v) for k, v in r.items()} for r in rows]
        epochs = len(history)
    except RunFileError as exc:
        problems.append(str(exc))
    best_row, best_epoch = _best(path, history, problems)
    summary = _read_json(path / "summary.json", problems)
    info = _read_json(path / "run.json", problems)
    evaluation = _read_json(path / "eval" / "metrics.json", problems)
    # wall time from the start of train (metrics.csv's elapsed); older runs: their epochs' step time
    seconds = history[-1].get("elapsed") if history else None
    if seconds is None and history:
        seconds = sum(h.get("seconds") or 0 for h in history)
    rates = [h["img_per_s"] for h in history if h.get("img_per_s")]
    stamp = path / "recipe.yaml"
    date = (
        datetime.fromtimestamp(stamp.stat().st_mtime).strftime("%Y-%m-%d %H:%M") if stamp.exists() else None
    )
    name = _name(path, root)
    row = {
        "run": name,
        "date": date,
        "arch": _arch(path, recipe, problems),
        "params": _value(summary, "total_params", path / "summary.json", problems, int),
        "epochs": epochs,
        "best_epoch": best_epoch,
        "val_acc": best_row.get("val_acc"),
        "val_loss": best_row.get("val_loss"),
        "test_acc": _value(evaluation, "accuracy", path / "eval" / "metrics.json", problems),
        "seconds": round(seconds, 3) if seconds is not None else None,  # ms: a tiny run takes 0.05 s
        "img_per_s": round(sum(rates) / len(rates), 1) if rates else None,
        "device": _value(info, "device", path / "run.json", problems, str),
        "precision": _value(info, "precision", path / "run.json", problems, str),
        "problems": problems,
    }
    return RunInfo(path, row, recipe, problems)


def _arch(path: Path, recipe: dict, problems: list[str]) -> str | None:
    """The architecture's name, or how many layers a recipe stack has."""
    model = recipe.get("model") or {}
    if not isinstance(model, dict):
        problems.append(f"{path / 'recipe.yaml'}: model: not a mapping")
        model = {}
    if model.get("arch"):
        return model["arch"]
    if isinstance(model.get("layers"), list):
        return f"layers ({len(model['layers'])})"
    return None


def _best(path: Path, history: list[dict], problems: list[str]) -> tuple[dict, int | None]:
    """The best epoch's metrics and number: the best checkpoint's, else the
    best validation epoch of metrics.csv."""
    best_row: dict = {}
    best_epoch = None
    if (path / "best.safetensors").exists():
        from imgcls.checkpoint import read_meta
        from imgcls.errors import CheckpointError

        try:
            meta = read_meta(path / "best.safetensors")
            best_row, best_epoch = meta.get("metrics") or {}, meta.get("epoch")
        except CheckpointError as exc:
            problems.append(str(exc))
        if not isinstance(best_row, dict):
            problems.append(f"{path / 'best.safetensors'}: metrics: not a mapping")
            best_row = {}
        where = path / "best.safetensors"
        best_epoch = _value({"epoch": best_epoch}, "epoch", where, problems, int)
        best_row = {k: _value(best_row, k, where, problems) for k in ("val_acc", "val_loss")}
    if all(v is None for v in best_row.values()) and history:  # no checkpoint: the best validation epoch
        with_val = [h for h in history if h.get("val_acc") is not None]
        if with_val:
            best_row = max(with_val, key=lambda h: h["val_acc"])
            best_epoch = int(best_row["epoch"])
    return best_row, best_epoch


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
    rows = _with_cv_groups(root, [(p, read_run(p, root).row) for p in find_runs(root)])
    if sort is not None:
        present = [r for r in rows if r[sort] is not None]
        missing = [r for r in rows if r[sort] is None]
        present.sort(key=lambda r: r[sort], reverse=sort in DESCENDING)
        rows = present + missing  # runs without the value last, whatever the order
    # each cross-validation's folds (and final run) right below its row, in fold order
    return [row for r in rows for row in (r, *r.pop("cv_runs", []))]


def _with_cv_groups(root: Path, runs: list[tuple[Path, dict]]) -> list[dict]:
    """The runs, with the folds of an ``imgcls cv`` folder (one holding cv.json)
    gathered under one row for the folder (:func:`read_cv`), where its first fold was."""
    rows: list[dict] = []
    groups: dict[Path, dict] = {}
    for path, row in runs:
        parent = path.parent
        if not (parent / "cv.json").is_file() or path == root:
            rows.append(row)
            continue
        if parent not in groups:
            groups[parent] = {"cv_runs": []}
            rows.append(groups[parent])
        row["cv_parent"] = _name(parent, root)
        groups[parent]["cv_runs"].append(row)
    for parent, group in groups.items():
        group["cv_runs"].sort(key=lambda r: _fold_order(Path(r["run"]).name))
        group.update(read_cv(parent, root, group["cv_runs"]))
    return rows


def _fold_order(name: str) -> tuple[int, str]:
    """fold-1, fold-2, ... fold-10, then the rest (final)."""
    number = name.removeprefix("fold-")
    return (int(number), "") if number.isdigit() else (1 << 30, name)


def _name(path: Path, root: Path | None) -> str:
    return str(path.relative_to(root)) if root is not None and path.is_relative_to(root) else str(path)


def read_cv(path: Path, root: Path | None, folds: list[dict]) -> dict:
    """A cross-validation folder as a row: the folds' means (cv.json's summary),
    their total time; arch, params and device from its first fold. ``cv``:
    the number of folds, how many are finished, and each metric's std."""
    problems: list[str] = []
    doc = _read_json(path / "cv.json", problems)
    summary = doc.get("summary") if isinstance(doc.get("summary"), dict) else {}
    assert isinstance(summary, dict)

    def stat(name: str, key: str) -> float | None:
        value = (summary.get(name) or {}).get(key) if isinstance(summary.get(name), dict) else None
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    first = folds[0] if folds else {}
    seconds = [f["seconds"] for f in folds if f.get("seconds") is not None]
    row: dict[str, Any] = {c: first.get(c) for c in ("date", "arch", "params", "device", "precision")}
    row.update(run=_name(path, root), epochs=None, test_acc=None, img_per_s=None)
    row.update({c: stat(c, "mean") for c in ("best_epoch", "val_acc", "val_loss")})
    row["seconds"] = round(sum(seconds), 3) if seconds else None
    runs = doc.get("runs") if isinstance(doc.get("runs"), list) else []
    std = {name: stat(name, "std") for name in summary}
    row["cv"] = {"folds": doc.get("folds"), "finished": len(runs or []), "std": std}
    row["problems"] = problems
    return {c: row.get(c) for c in COLUMNS} | {"cv": row["cv"], "problems": problems}


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
