"""``report.html``: one self-contained page about a run, to open in any browser.

Everything is inside the one file: images are inlined as ``data:`` URIs, the
style sheet and the few lines of table sorting are inline, and nothing is
fetched from the network (no scripts, fonts or images from elsewhere). It
reads on a phone (one column, tables scroll sideways) and on a laptop.

The page is built from what the run folder holds, so it can be rewritten at
any time: ``train`` writes it at the end of a run, ``evaluate`` refreshes it
(final metrics, per-class table, confusion matrix, error gallery), and
``imgcls report RUN`` rebuilds it on demand. Sections whose files are absent
(no evaluation yet, no explain overlays, no data check) are left out.
"""

from __future__ import annotations

import base64
import html
import os
import platform
import sys
from contextlib import contextmanager
from pathlib import Path

from imgcls.checkpoint import resolve_checkpoint
from imgcls.errors import UsageError
from imgcls.io import write_text_atomic
from imgcls.runs import RunFileError, read_recipe_file

REPORT = "report.html"
MAX_OVERLAYS = 24

_CSS = """
:root { color-scheme: light dark; --fg: #1b1f24; --bg: #fff; --muted: #656d76; --line: #d0d7de; --head: #f6f8fa; }
@media (prefers-color-scheme: dark) { :root { --fg: #e6edf3; --bg: #0d1117; --muted: #8d96a0; --line: #30363d; --head: #161b22; } }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1100px; padding: 12px; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--fg); background: var(--bg); }
h1 { font-size: 1.4em; margin: 0.2em 0; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid var(--line); }
.muted { color: var(--muted); }
.scroll { overflow-x: auto; -webkit-overflow-scrolling: touch; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 0.4em 0; }
th, td { border: 1px solid var(--line); padding: 3px 8px; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: var(--head); }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort=ascending]::after { content: " \\25B2"; }
table.sortable th[aria-sort=descending]::after { content: " \\25BC"; }
img { max-width: 100%; height: auto; border: 1px solid var(--line); }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 8px; }
.grid figure { margin: 0; } .grid figcaption { font-size: 0.8em; color: var(--muted); overflow-wrap: anywhere; }
pre { background: var(--head); padding: 8px; overflow-x: auto; font-size: 0.85em; }
"""

# Click a header to sort by that column (numbers as numbers); click again to reverse.
_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  table.querySelectorAll("th").forEach(function (th, col) {
    th.addEventListener("click", function () {
      var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
      var dir = th.getAttribute("aria-sort") === "ascending" ? -1 : 1;
      table.querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", dir === 1 ? "ascending" : "descending");
      function key(r) { var t = r.cells[col].getAttribute("data-v") || r.cells[col].textContent.trim();
                        var n = parseFloat(t); return isNaN(n) || !/^[-+.\\d]/.test(t) ? t.toLowerCase() : n; }
      rows.sort(function (a, b) { var x = key(a), y = key(b);
        if (typeof x !== typeof y) { x = String(x); y = String(y); }
        return x < y ? -dir : x > y ? dir : 0; });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _e(value) -> str:
    return html.escape(str(value))


def _png(path: Path, alt: str, element_id: str | None = None) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    ident = f' id="{element_id}"' if element_id else ""
    return f'<img{ident} alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value) -> str:
    if isinstance(value, float):
        if value and abs(value) < 1e-3:
            return f"{value:.2e}"  # learning rates near the end of a schedule
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, int) and abs(value) >= 10000:
        return f"{value:,}"
    return str(value)


def _table(
    header: list[str], rows: list[list], *, element_id: str | None = None, sortable: bool = True
) -> str:
    ident = f' id="{element_id}"' if element_id else ""
    cls = ' class="sortable"' if sortable else ""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td data-v="{_e(c)}">{_e(_fmt(c))}</td>' for c in row) + "</tr>" for row in rows
    )
    return f'<div class="scroll"><table{ident}{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def _read_json(path: Path) -> dict | None:
    from imgcls.runs import read_json_file

    return read_json_file(path)


def _read_history(path: Path) -> list[dict]:
    from imgcls.runs import read_metrics_file

    return read_metrics_file(path) or []


@contextmanager
def _reading(path: Path):
    """A section drawn from ``path``: content of the wrong shape (a missing
    key, a list where a mapping belongs) is one line naming the file."""
    try:
        yield
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        detail = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
        raise RunFileError(f"{path}: not what imgcls writes there ({detail})") from None


def _seconds(value: float) -> str:
    """0.043 s, 2.5 s, 130 s: never "0.0 s" for a short run."""
    return f"{value:.2g} s" if value < 10 else f"{value:.0f} s"


def _number(text: str):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text or ""
    return int(value) if value.is_integer() and "." not in text else value


def run_folder(target: str | os.PathLike) -> Path:
    path = Path(target).expanduser()
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise UsageError(f"{path}: no such run folder")
    if not (path / "recipe.yaml").is_file():
        resolved = resolve_checkpoint(path).parent  # runs/<name> -> its latest run
        if not (resolved / "recipe.yaml").is_file():
            raise UsageError(f"{path}: not a run folder (no recipe.yaml)")
        path = resolved
    return path


def environment() -> list[list[str]]:
    import torch
    import torchvision

    from imgcls import __version__

    return [
        ["imgcls", __version__],
        ["python", sys.version.split()[0]],
        ["torch", torch.__version__],
        ["torchvision", torchvision.__version__],
        ["platform", platform.platform()],
        ["cpu cores", str(os.cpu_count())],
        ["torch threads", str(torch.get_num_threads())],
        ["cuda", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"],
    ]


def build_report(run: str | os.PathLike) -> str:
    """The HTML of the report for run folder ``run``: one section after another."""
    run_dir = run_folder(run)
    recipe_text, recipe = read_recipe_file(run_dir / "recipe.yaml") or ("", {})
    train_spec = recipe.get("train", {}) or {}
    if not isinstance(train_spec, dict):
        raise RunFileError(f"{run_dir / 'recipe.yaml'}: train: not a mapping")
    history = _read_history(run_dir / "metrics.csv")
    evaluation = _read_json(run_dir / "eval" / "metrics.json")
    name = recipe.get("name", run_dir.parent.name)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # no network, even by accident: everything this page shows is inline
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'; script-src 'unsafe-inline'\">",
        f"<title>{_e(name)}: imgcls run report</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(name)}</h1><p class=muted>run folder {_e(run_dir)}</p>",
    ]
    parts += _final_metrics(run_dir, evaluation, history)
    parts += _training(run_dir, history)
    parts += _evaluation(run_dir, evaluation)
    parts += _calibration(run_dir, evaluation)
    parts += _explanations(run_dir)
    parts += _data_check(run_dir, _read_json(run_dir / "data-check.json"))
    parts += _model(run_dir, _read_json(run_dir / "summary.json"))
    parts.append("<h2>Recipe</h2><pre>" + _e(recipe_text) + "</pre>")
    parts += _environment(train_spec)
    parts.append(f"<script>{_JS}</script></body></html>\n")
    return "\n".join(parts)


def _final_metrics(run_dir: Path, evaluation: dict | None, history: list[dict]) -> list[str]:
    """The evaluation when there is one, else the best epoch."""
    parts = ["<h2>Final metrics</h2>"]
    rows: list[list] = []
    if evaluation:
        with _reading(run_dir / "eval" / "metrics.json"):
            parts.append(f"<p class=muted>evaluate on {_e(evaluation.get('data', ''))}</p>")
            rows.append(["accuracy", evaluation["accuracy"]])
            if "balanced_accuracy" in evaluation:
                rows.append(["balanced accuracy", evaluation["balanced_accuracy"]])
            if "top_k_accuracy" in evaluation:
                rows.append([f"top-{evaluation.get('top_k')} accuracy", evaluation["top_k_accuracy"]])
            rows.append(["loss", evaluation.get("loss", "")])
            for kind in ("macro", "weighted"):
                if kind in evaluation:
                    rows.append([f"{kind} F1", evaluation[kind]["f1"]])
            rows.append(["images", evaluation.get("samples", "")])
    elif history:
        key = "val_acc" if history[0].get("val_acc") else "train_loss"
        scored = [h for h in history if h.get(key)]
        if scored:
            pick = max if key == "val_acc" else min
            best = pick(scored, key=lambda h: float(h[key]))
            parts.append(f"<p class=muted>best epoch {best['epoch']} (by {key}); no evaluation yet</p>")
            for col in ("val_acc", "val_loss", "train_acc", "train_loss"):
                if best.get(col):
                    rows.append([col.replace("val_acc", "accuracy"), _number(best[col])])
    if rows:
        parts.append(_table(["metric", "value"], rows, element_id="metrics", sortable=False))
    return parts


def _training(run_dir: Path, history: list[dict]) -> list[str]:
    parts = []
    if (run_dir / "curves.png").is_file():
        parts.append("<h2>Training curves</h2>" + _png(run_dir / "curves.png", "training curves", "curves"))
    if history:
        cols = [c for c in history[0] if any(h.get(c) for h in history)]
        parts.append(
            _table(cols, [[_number(h.get(c, "")) for c in cols] for h in history], element_id="history")
        )
        # timings are in metrics.csv (never in a checkpoint): elapsed is the run's wall time,
        # seconds each epoch's training steps alone (what img/s is measured on)
        steps = sum(float(h.get("seconds") or 0) for h in history)
        elapsed = history[-1].get("elapsed")
        parts.append(
            f"<p id=timing>training time {_seconds(float(elapsed))} over {len(history)} epochs, of which "
            f"{_seconds(steps)} in training steps (the rest: data preparation, validation, checkpoints)</p>"
            if elapsed
            else f"<p id=timing>training steps {_seconds(steps)} over {len(history)} epochs</p>"
        )
    return parts


def _evaluation(run_dir: Path, evaluation: dict | None) -> list[str]:
    """Per class, the confusion matrix and its most confused pairs, the error gallery."""
    parts = []
    if evaluation:
        with _reading(run_dir / "eval" / "metrics.json"):
            parts.append("<h2>Per class</h2>")
            parts.append(
                _table(
                    ["class", "precision", "recall", "f1", "support"],
                    [
                        [r["class"], r["precision"], r["recall"], r["f1"], r["support"]]
                        for r in evaluation.get("per_class", [])
                    ],
                    element_id="per-class",
                )
            )
            if (run_dir / "eval" / "confusion.png").is_file():
                parts.append(
                    "<h2>Confusion matrix</h2>"
                    + _png(run_dir / "eval" / "confusion.png", "confusion matrix", "confusion")
                )
            pairs = evaluation.get("confused_pairs") or []
            if pairs:
                parts.append(
                    _table(
                        ["true", "predicted", "count", "share of true"],
                        [[p["true"], p["predicted"], p["count"], p["share"]] for p in pairs],
                        element_id="confused",
                    )  # fmt: skip
                )
    gallery = run_dir / "eval" / "errors.png"
    if gallery.is_file():
        parts.append("<h2>Mistakes</h2>" + _png(gallery, "misclassified images", "gallery"))
    return parts


def _calibration(run_dir: Path, evaluation: dict | None) -> list[str]:
    """The stored temperature (best.safetensors), and evaluate's ECE / MCE / NLL /
    Brier before and after with its reliability diagram."""
    from imgcls.calibration import summary_line
    from imgcls.checkpoint import BEST, read_meta
    from imgcls.errors import CheckpointError

    parts = []
    try:
        stored = read_meta(run_dir / BEST).get("calibration") if (run_dir / BEST).is_file() else None
    except CheckpointError:
        stored = None  # the checkpoint's own problems are said by the commands that load it
    if stored is not None:
        parts.append(f"<p id=temperature>{_e(summary_line(stored))}</p>")
    cal = (evaluation or {}).get("calibration")
    if cal:
        with _reading(run_dir / "eval" / "metrics.json"):
            names = {"ece": f"ECE ({cal['n_bins']} bins)", "mce": "MCE", "nll": "NLL", "brier": "Brier"}
            rows = [[name, cal["before"][key], cal["after"][key]] for key, name in names.items()]
            header = ["metric", "before (T = 1)", "after"]
            parts.append(_table(header, rows, element_id="calibration", sortable=False))
    png = run_dir / "eval" / "reliability.png"
    if cal and png.is_file():
        parts.append(_png(png, "reliability diagram, before and after calibration", "reliability"))
    return ["<h2>Calibration</h2>", *parts] if parts else []


def _explanations(run_dir: Path) -> list[str]:
    overlays = sorted((run_dir / "explain").glob("*.png")) if (run_dir / "explain").is_dir() else []
    if not overlays:
        return []
    parts = ["<h2>Explanations</h2><div class=grid>"]
    for png in overlays[:MAX_OVERLAYS]:
        parts.append(f"<figure>{_png(png, png.name)}<figcaption>{_e(png.name)}</figcaption></figure>")
    parts.append("</div>")
    if len(overlays) > MAX_OVERLAYS:
        parts.append(f"<p class=muted>{len(overlays) - MAX_OVERLAYS} more in {_e(run_dir / 'explain')}</p>")
    return parts


def _data_check(run_dir: Path, check: dict | None) -> list[str]:
    if not check:
        return []
    with _reading(run_dir / "data-check.json"):
        problem_rows = [[key.replace("_", " "), len(found)] for key, found in check.get("problems", {}).items()]
        return [
            f"<h2>Data check</h2><p class=muted>{_e(check.get('root', ''))}: {check.get('files')} files</p>",
            _table(["finding", "count"], problem_rows, element_id="data-check"),
        ]


def _model(run_dir: Path, summary: dict | None) -> list[str]:
    if not summary:
        return []
    with _reading(run_dir / "summary.json"):
        rows = [
            [r["name"], r["type"], "x".join(map(str, r["output_shape"] or [])), r["params"], r["macs"]]
            for r in summary.get("rows", [])
        ]
        return [
            f"<h2>Model</h2><p>{_e(summary.get('name', ''))}: {summary.get('total_params', 0):,} parameters, "
            f"{summary.get('total_macs', 0):,} MACs, input {_e('x'.join(map(str, summary.get('input_shape', []))))}</p>",
            _table(["layer", "type", "output", "params", "MACs"], rows, element_id="summary"),
        ]


def _environment(train_spec: dict) -> list[str]:
    env = environment() + [
        ["device (recipe)", str(train_spec.get("device", "auto"))],
        ["precision (recipe)", str(train_spec.get("precision", "auto"))],
        ["channels_last (recipe)", str(train_spec.get("channels_last", "auto"))],
        ["threads (recipe)", str(train_spec.get("threads") or "torch default")],
    ]
    return [
        "<h2>Environment</h2><p class=muted>of the machine that wrote this report</p>",
        _table(["", ""], env, element_id="environment", sortable=False),
    ]

def write_report(run: str | os.PathLike) -> Path:
    """Write ``<run>/report.html`` (atomically) and return its path."""
    run_dir = run_folder(run)
    path = run_dir / REPORT
    write_text_atomic(path, build_report(run_dir))
    return path
