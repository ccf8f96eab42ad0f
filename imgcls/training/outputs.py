"""What a run writes besides checkpoints: metrics.csv, curves.png, the model
summary and run.json, each atomically.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
from torch import nn

from imgcls.io import atomic_path, write_text_atomic

# in metrics.csv, never in a weight file (bit-identical runs). seconds: the epoch's training
# steps (img_per_s's time); elapsed: wall time since the run started (data preparation,
# validation and checkpoints included; a resumed run goes on from its last epoch's)
TIMINGS = ("seconds", "img_per_s", "elapsed")


def write_summary(run_dir: Path, model: nn.Module, input_shape) -> None:
    from imgcls.summary import summarize_model, summary_text

    summary = summarize_model(model, tuple(input_shape))
    write_text_atomic(run_dir / "summary.txt", summary_text(summary))
    write_text_atomic(run_dir / "summary.json", json.dumps(summary.to_dict(), indent=2))


COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "img_per_s", "elapsed"]


def elapsed(history: list[dict]) -> float:
    """The wall time a run had taken by its last finished epoch (older runs
    have no ``elapsed``: the sum of their epochs' step times)."""
    if not history:
        return 0.0
    last = history[-1].get("elapsed")
    return float(last) if last is not None else float(sum(h.get("seconds") or 0 for h in history))


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    columns = COLUMNS if "val_f1" not in history[0] else [*COLUMNS[:6], "val_f1", *COLUMNS[6:]]
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(run_dir / "metrics.csv", buffer.getvalue())


def plot_curves(run_dir: Path, history: list[dict]) -> None:
    # a bare Figure on the Agg canvas (no pyplot, no figure manager) and fixed
    # margins instead of tight_layout: the same picture in about half the time
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(10, 4))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    fig.subplots_adjust(left=0.065, right=0.985, bottom=0.135, top=0.91, wspace=0.16)
    for key, ax in (("loss", ax_loss), ("acc", ax_acc)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train")
        if "val_" + key in history[0]:
            ax.plot(epochs, [h.get(f"val_{key}") for h in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title("loss" if key == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    with atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def write_run_info(run_dir: Path, info: dict) -> None:
    """run.json: device, precision, channels_last, torch's version and the like."""
    write_text_atomic(run_dir / "run.json", json.dumps({**info, "torch": torch.__version__}, indent=2))
