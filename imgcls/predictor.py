"""Load a model to predict with: a checkpoint, an exported file, or published weights.

:func:`load_predictor` opens any of them as one :class:`Predictor` (classes,
preprocessing and a forward function). This module never imports model code
(``imgcls.models``) at import time, nor anything of training: predicting with
an exported ONNX file must not build a torch model.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from imgcls.calibration import Temperature, probabilities
from imgcls.errors import CheckpointError, UsageError
from imgcls.forward import Forward, logits, model_input, tta_logits

Log = Callable[[str], None]
EXPORTED_SUFFIXES = (".onnx", ".pt", ".ts")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Predictor:
    classes: list[str]
    preprocessing: dict
    forward: Forward  # normalised float NCHW -> model output (see main_logits)
    source: str  # what was loaded, for the log
    task: str = "single"  # or "multilabel": a sigmoid per class, a label on at its threshold
    thresholds: list[float] | None = None  # multi-label: per class (0.5 unless tuned)
    temperature: Temperature = 1.0  # calibration: logits / T before softmax (one T per class: multi-label)
    calibration: dict | None = None  # the stored calibration document (imgcls.calibration), if any

    def batch_logits(self, x_uint8: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
        """A decoded uint8 batch through the model (with test-time augmentation when ``tta``)."""
        x = model_input(x_uint8, self.preprocessing["mean"], self.preprocessing["std"])
        return tta_logits(self.forward, x) if tta else logits(self.forward, x)


def _task_fields(meta: dict) -> dict:
    """Task, thresholds and calibration from checked metadata (no calibration: T = 1)."""
    from imgcls.metadata import task_of, temperature_of, thresholds_of

    task = task_of(meta)
    return {
        "task": task,
        "thresholds": thresholds_of(meta) if task == "multilabel" else None,
        "temperature": temperature_of(meta),
        "calibration": meta.get("calibration"),
    }


def load_predictor(
    model: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    pretrained: bool = False,
    runs_root: Path = Path("runs"),
    log: Log = _stderr,
) -> Predictor:
    """The model to predict with: a checkpoint, an exported file or a torchvision arch."""
    if arch is not None:
        if model is not None:
            raise UsageError("give --model or --arch, not both")
        if not pretrained:
            raise UsageError(
                f"--arch {arch} without --pretrained would predict with random weights; "
                "add --pretrained (ImageNet classes) or pass your own --model"
            )
        return load_pretrained(arch, log)
    if pretrained:
        raise UsageError("--pretrained needs --arch NAME (e.g. --arch resnet18)")
    if model is None:
        from imgcls.checkpoint import latest_run

        path = latest_run(runs_root)
        log(f"model: {path} (the most recent run; choose another with --model)")
        model = path
    path = Path(model).expanduser()
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        return _load_exported(path)
    from imgcls.checkpoint import load_checkpoint

    return checkpoint_predictor(load_checkpoint(path))


def checkpoint_predictor(ckpt) -> Predictor:
    """A loaded :class:`imgcls.checkpoint.Checkpoint` as a :class:`Predictor`."""
    return Predictor(
        list(ckpt.classes), dict(ckpt.preprocessing), ckpt.model, str(ckpt.path), **_task_fields(ckpt.meta)
    )


def _load_exported(path: Path) -> Predictor:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such exported model")
    try:
        from imgcls.export.runtime import load_exported
    except ImportError:
        raise CheckpointError(
            f"{path}: exported models need imgcls.export, which this install lacks"
        ) from None
    exported = load_exported(path)
    return Predictor(
        list(exported.classes),
        dict(exported.preprocessing),
        exported,
        str(path),
        **_task_fields(exported.meta),
    )


def pretrained_preprocessing(weights) -> dict:
    """Our preprocessing dict for torchvision ``weights.transforms()``."""
    t = weights.transforms()
    crop = list(t.crop_size)
    crop = crop * 2 if len(crop) == 1 else crop
    resize = list(t.resize_size)
    return {
        "image_size": crop,
        "channels": 3,
        "mean": [float(v) for v in t.mean],
        "std": [float(v) for v in t.std],
        "resize": "center_crop",
        "resize_to": int(resize[0]),  # the shorter side, before the crop
        "interpolation": t.interpolation.value,
    }


def load_pretrained(arch: str, log: Log = _stderr) -> Predictor:
    """torchvision ``arch`` with its DEFAULT weights (:func:`imgcls.models.zoo.load_published`)."""
    from imgcls.models.zoo import load_published

    net, weights = load_published(arch, log)
    net.eval()
    categories = list(weights.meta["categories"])
    log(f"model: {arch} with {weights} ({len(categories)} ImageNet classes)")
    return Predictor(categories, pretrained_preprocessing(weights), net, f"{arch} ({weights})")


def predict_scores(predictor: Predictor, logits_: torch.Tensor) -> torch.Tensor:
    """Logits -> calibrated probabilities: the logits divided by the model's
    temperature (:mod:`imgcls.calibration`; 1 when it has none), then softmax
    over classes (single label), or one sigmoid per class (multi-label: each
    label on its own). Every command that shows a probability comes here."""
    return probabilities(logits_, predictor.task == "multilabel", predictor.temperature)


def multilabel_labels(
    predictor: Predictor, probs: torch.Tensor, threshold: float | None = None
) -> list[list[tuple[str, float]]]:
    """Per row of ``probs`` (from :func:`predict_scores`), a multi-label model's
    labels: every class at or above its threshold (the model's own, 0.5 unless
    tuned; ``threshold`` replaces them all), highest probability first."""
    n = len(predictor.classes)
    cuts = torch.tensor(
        [threshold] * n if threshold is not None else predictor.thresholds or [0.5] * n, dtype=probs.dtype
    )
    out = []
    for row in probs:
        on = torch.nonzero(row >= cuts).flatten().tolist()
        out.append(sorted(((predictor.classes[i], float(row[i])) for i in on), key=lambda t: -t[1]))
    return out
