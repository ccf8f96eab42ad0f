"""``imgcls calibrate``: refit a run's temperature on labelled images.

Training fits the temperature on the run's validation split
(:func:`imgcls.training.validation.calibrate`). This refits it on other
labelled data (a folder of class folders or a CSV, as evaluate takes them;
by default the run's validation split again, never its test split) and
writes it into the run's checkpoints: ``best.safetensors``,
``last.safetensors`` and tuned copies (``*-tuned.safetensors``) for a run
folder, or the one file given. Only the metadata changes: the weights are
copied byte for byte, and every file is renamed into place only once all of
them are written (:func:`imgcls.checkpoint.store_calibration`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from imgcls import calibration, interrupts
from imgcls.checkpoint import BEST, LAST, RESUME, hold_run, holding_runs, load_checkpoint, store_calibration
from imgcls.errors import DataError, PartialFailure, UsageError
from imgcls.evaluate import class_index, labelled_items, run_split, score_items
from imgcls.metadata import task_of

Log = Callable[[str], None]


@dataclass
class CalibrateResult:
    checkpoint: Path  # whose logits the temperature was fitted on
    data: str  # where, in words
    stored: dict  # the calibration document written
    report: dict  # imgcls.calibration.calibration_report (before: T = 1, after: the new T)
    previous: dict | None  # the calibration the checkpoint had
    written: list[Path] = field(default_factory=list)
    bad: list[tuple[Path, str]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "data": self.data,
            "calibration": self.stored,
            "previous": self.previous,
            **{k: self.report[k] for k in ("temperature", "n_bins", "brier", "before", "after")},
            "written": [str(p) for p in self.written],
            "skipped": len(self.bad),
        }

    def raise_if_skipped(self) -> None:
        """Exit 3 once the result is out, when some images could not be read."""
        if self.bad:
            raise PartialFailure(
                f"{len(self.bad)} images could not be read and were skipped (the fit used the others)"
            )


def recalibrate(
    target: str | os.PathLike,
    data: str | os.PathLike | None = None,
    *,
    batch_size: int = 128,
    log: Log = lambda message: None,
) -> CalibrateResult:
    """Fit the temperature of ``target``'s kept weights on ``data`` and store it."""
    with holding_runs():
        return _recalibrate(target, data, batch_size, log)


def _recalibrate(target, data, batch_size: int, log: Log) -> CalibrateResult:
    ckpt = load_checkpoint(target)
    hold_run(ckpt.path.parent, "calibrate it once that has finished")  # not while train writes them
    multilabel = task_of(ckpt.meta) == "multilabel"
    if data is None and ckpt.recipe.data.val_split == 0:
        raise UsageError(
            f"{ckpt.path}: the run has no validation split (data.val_split is 0); "
            "give labelled images: imgcls calibrate RUN --data DIR"
        )
    items, where = labelled_items(ckpt, data) if data is not None else run_split(ckpt, "val")
    several = next((label for _, label in items if isinstance(label, tuple)), None)
    if several is not None and not multilabel:
        raise DataError(f"{where}: rows with several or no labels, but {ckpt.path} is a single-label model")
    index = class_index(ckpt.classes, {n for _, label in items for n in _names(label)}, where)
    log(f"calibrating {ckpt.path} on {where}: {len(items)} images")
    scores, _, targets, files, bad = score_items(ckpt, items, index, batch_size, multilabel)
    for path, reason in bad[:10]:
        log(f"warning: skipped {path}: {reason}")
    if not files:
        raise DataError(f"{where}: none of the {len(items)} images could be read")
    stored, report = calibration.fitted(scores, targets, multilabel, f"{where} ({len(files)} images)")
    paths = _checkpoints(Path(target).expanduser(), ckpt.path)
    interrupts.check()  # nothing written yet
    store_calibration(paths, stored)
    log(f"{calibration.describe(stored['temperature'])}; wrote it into {', '.join(p.name for p in paths)}")
    exports = sorted(
        p.name for p in ckpt.path.parent.glob("*") if p.suffix in (".onnx", ".pt", ".ts") and p.name != RESUME
    )
    if exports:
        log(f"note: {', '.join(exports)} still carry the temperature they were exported with; export again")
    return CalibrateResult(ckpt.path, where, stored, report, ckpt.meta.get("calibration"), paths, bad)


def _checkpoints(target: Path, loaded: Path) -> list[Path]:
    """A run folder's checkpoints (best, last, tuned copies), or the one file given."""
    if not target.is_dir():
        return [loaded]
    folder = loaded.parent
    found = [folder / name for name in (BEST, LAST) if (folder / name).is_file()]
    return found + sorted(folder.glob("*-tuned.safetensors"))


def _names(label) -> tuple[str, ...]:
    return label if isinstance(label, tuple) else (label,)
