"""Multi-label thresholds: each class's F1-optimal threshold, picked on the
run's validation split and written into a copy of the checkpoint
(``<stem>-tuned.safetensors``), which predict and export then use.

A step of ``imgcls evaluate --tune-thresholds``, run before the metrics
(:func:`imgcls.evaluate.evaluate` then evaluates at these thresholds).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from imgcls import interrupts
from imgcls.calibration import scale
from imgcls.checkpoint import Checkpoint, save_checkpoint
from imgcls.errors import UsageError
from imgcls.evaluate import TunedThresholds, run_split, score_items
from imgcls.metadata import task_of, temperature_of
from imgcls.metrics import f1_optimal_thresholds

Log = Callable[[str], None]


def tune_thresholds(ckpt: Checkpoint, *, batch_size: int, log: Log) -> TunedThresholds:
    """Pick, write and say the thresholds; a single-label checkpoint is a usage error."""
    if task_of(ckpt.meta) != "multilabel":
        raise UsageError(
            f"{ckpt.path}: --tune-thresholds is for multi-label models (a threshold per class); "
            "this checkpoint is single-label (softmax: the top class wins)"
        )
    items, where = run_split(ckpt, "val")
    log(f"tuning thresholds on {where}: {len(items)} images")
    index = {name: i for i, name in enumerate(ckpt.classes)}
    scores, _, targets, _, _ = score_items(ckpt, items, index, batch_size, True)
    # on the calibrated probabilities, which predict compares with them
    thresholds = f1_optimal_thresholds(torch.sigmoid(scale(scores, temperature_of(ckpt.meta))), targets)
    interrupts.check()  # a Ctrl-C that compiled code swallowed: nothing written yet
    tuned = tuned_path(ckpt.path)
    save_checkpoint(tuned, ckpt.model, {**ckpt.meta, "thresholds": thresholds})
    shown = ", ".join(f"{c} {t:.3f}" for c, t in zip(ckpt.classes, thresholds, strict=True))
    log(f"thresholds: {shown}; wrote {tuned} (predict --model {tuned} uses them)")
    return TunedThresholds(thresholds, tuned, where)


def tuned_path(path: Path) -> Path:
    """``best.safetensors`` -> ``best-tuned.safetensors`` (tuning a tuned copy replaces it)."""
    stem = path.stem.removesuffix("-tuned")
    return path.with_name(f"{stem}-tuned{path.suffix}")
