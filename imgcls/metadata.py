"""The imgcls metadata inside checkpoints and exports, validated on load.

A checkpoint, an ONNX or a TorchScript file may come from someone else, so the
JSON document imgcls stores in it is input like any other: every key that
decides what is built, allocated or shown is checked here, in one place, before
a model is built or an image decoded. Each problem is one
:class:`~imgcls.errors.CheckpointError` (exit 2) naming the file and the key.

Plain checks rather than a pydantic model: each rule needs its own message
(``not an imgcls checkpoint`` vs ``newer``, the head's size, the pixel bound),
and the rules are few. No torch import: predicting with an ONNX file reads its
metadata without loading model code.

Bounds: each side of the input image is 1..``MAX_SIDE`` (4096) pixels. A
trained classifier's input is rarely above 600 px (torchvision's largest
published weights take 518); 4096 px per side still lets a batch of 64 RGB
images fit in 13 GB of float32, whereas a crafted size of 10^6 used to make
predict allocate until the kernel killed it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from imgcls.errors import CheckpointError

CHECKPOINT_FORMAT = "imgcls-checkpoint"
CHECKPOINT_VERSION = 1
EXPORT_FORMAT = "imgcls-export"
EXPORT_VERSION = 1

MAX_SIDE = 4096  # pixels per side of the model's input
MAX_BATCH = 65536  # a static export's fixed batch size
CHANNELS = (1, 3)
RESIZE_POLICIES = ("stretch", "center_crop", "pad")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
TASKS = ("single", "multilabel")  # absent means single


def parse_checkpoint_meta(raw: str | bytes | None, where: str) -> dict:
    """The ``imgcls`` header of a checkpoint's safetensors file, checked."""
    meta = _parse(raw, where, "checkpoint")
    _check_format(meta, where, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, "checkpoint")
    check_common(meta, where)
    if not isinstance(meta.get("recipe"), dict):
        raise CheckpointError(f"{where}: recipe: missing or not a mapping (the checkpoint's recipe)")
    return meta


def parse_export_meta(raw: str | bytes | None, where: str) -> dict:
    """The ``imgcls`` document of an exported file (ONNX, TorchScript, safetensors), checked."""
    meta = _parse(raw, where, "export")
    _check_format(meta, where, EXPORT_FORMAT, EXPORT_VERSION, "export")
    check_common(meta, where)
    batch = meta.get("batch_size")
    if batch is not None and not (_is_int(batch) and 1 <= batch <= MAX_BATCH):
        raise CheckpointError(f"{where}: batch_size: {batch!r} is not null or a whole number 1..{MAX_BATCH}")
    for key in ("input", "output"):
        if key in meta and not (isinstance(meta[key], str) and meta[key]):
            raise CheckpointError(f"{where}: {key}: {meta[key]!r} is not a tensor name")
    return meta


def check_common(meta: dict, where: str) -> None:
    """Rules shared by checkpoints and exports: classes, preprocessing, input_shape,
    task and per-class thresholds."""
    check_classes(meta.get("classes"), where)
    check_task(meta, where)
    check_calibration(meta, where)
    pre: Any = meta.get("preprocessing")
    check_preprocessing(pre, where)
    shape = meta.get("input_shape")
    expected = [pre["channels"], *pre["image_size"]]
    if not (isinstance(shape, list) and all(_is_int(v) for v in shape) and shape == expected):
        raise CheckpointError(
            f"{where}: input_shape: {shape!r} does not match the preprocessing "
            f"(channels {pre['channels']}, image_size {pre['image_size']}: expected {expected})"
        )


def task_of(meta: dict) -> str:
    """``single`` (one class per image, softmax) or ``multilabel`` (sigmoid per class)."""
    return meta.get("task") or "single"


def check_task(meta: dict, where: str) -> None:
    """``task`` is single or multilabel; ``thresholds`` (multi-label only) is one
    probability in [0, 1] per class."""
    task = meta.get("task", "single")
    if task not in TASKS:
        raise CheckpointError(f"{where}: task: {task!r} is not one of {', '.join(TASKS)}")
    thresholds = meta.get("thresholds")
    if thresholds is None:
        return
    if task != "multilabel":
        raise CheckpointError(f"{where}: thresholds: only a multilabel model has per-class thresholds")
    classes = meta.get("classes") or []
    if not (isinstance(thresholds, list) and len(thresholds) == len(classes)):
        raise CheckpointError(f"{where}: thresholds: not a list of {len(classes)} numbers (one per class)")
    for i, t in enumerate(thresholds):
        if not (_is_number(t) and 0 <= t <= 1):
            raise CheckpointError(f"{where}: thresholds[{i}]: {t!r} is not a probability in 0..1")


def thresholds_of(meta: dict) -> list[float]:
    """The per-class decision thresholds of a multi-label model (0.5 unless tuned)."""
    stored = meta.get("thresholds")
    return [float(t) for t in stored] if stored else [0.5] * len(meta["classes"])


MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 1e3  # outside, logits / T over- or underflow


def check_calibration(meta: dict, where: str) -> None:
    """``calibration`` (absent in older files: T = 1) is a mapping whose
    ``temperature`` is a finite number in 1e-3..1e3, or for a multi-label
    model one such number per class (:mod:`imgcls.calibration`)."""
    cal = meta.get("calibration")
    if cal is None:
        return
    key = "calibration"
    if not isinstance(cal, dict):
        raise CheckpointError(f"{where}: {key}: {cal!r} is not a mapping")
    t: Any = cal.get("temperature")
    per_class = isinstance(t, list)
    if per_class:
        classes = meta.get("classes") or []
        if task_of(meta) != "multilabel":
            raise CheckpointError(f"{where}: {key}.temperature: one per class is for multi-label models only")
        if len(t) != len(classes):
            raise CheckpointError(
                f"{where}: {key}.temperature: {len(t)} values, not one per class ({len(classes)})"
            )
    for i, v in enumerate(t if per_class else [t]):
        at = f"{key}.temperature" + (f"[{i}]" if per_class else "")
        if not (_is_number(v) and math.isfinite(v) and MIN_TEMPERATURE <= v <= MAX_TEMPERATURE):
            raise CheckpointError(
                f"{where}: {at}: {v!r} is not a finite temperature in {MIN_TEMPERATURE:g}..{MAX_TEMPERATURE:g}"
            )
    for name in ("ece_before", "ece_after", "nll_before", "nll_after"):
        v = cal.get(name)
        if v is not None and not (_is_number(v) and math.isfinite(v) and v >= 0):
            raise CheckpointError(f"{where}: {key}.{name}: {v!r} is not a finite number >= 0")
    fitted_on = cal.get("fitted_on")
    if fitted_on is not None and not isinstance(fitted_on, str):
        raise CheckpointError(f"{where}: {key}.fitted_on: {fitted_on!r} is not text")


def temperature_of(meta: dict) -> float | list[float]:
    """The stored temperature (checked by :func:`check_calibration`); 1 when
    there is none (a checkpoint from before calibration, or one never fitted)."""
    cal = meta.get("calibration") or {}
    t = cal.get("temperature", 1.0)
    return [float(v) for v in t] if isinstance(t, list) else float(t)


def check_classes(classes: object, where: str) -> None:
    if classes is None:
        raise CheckpointError(f"{where}: classes: missing (the class names in index order)")
    if not isinstance(classes, list) or not classes:
        raise CheckpointError(f"{where}: classes: not a non-empty list of class names")
    for i, name in enumerate(classes):
        if not isinstance(name, str) or not name.strip():
            raise CheckpointError(f"{where}: classes[{i}]: {name!r} is not a non-empty name")
    seen: set[str] = set()
    for i, name in enumerate(classes):
        if name in seen:
            raise CheckpointError(f"{where}: classes[{i}]: '{name}' appears twice (names must be unique)")
        seen.add(name)


def check_head(classes: Sequence[str], outputs: int, where: str, what: str) -> None:
    """The class list and the model's output width agree (``what`` names the output)."""
    if outputs != len(classes):
        raise CheckpointError(f"{where}: classes: {len(classes)} names, but {what} has {outputs} outputs")


def check_preprocessing(pre: object, where: str) -> None:
    key = "preprocessing"
    if not isinstance(pre, dict):
        raise CheckpointError(f"{where}: {key}: missing or not a mapping")
    size = pre.get("image_size")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) for v in size)):
        raise CheckpointError(f"{where}: {key}.image_size: {size!r} is not [height, width] in pixels")
    if not all(1 <= v <= MAX_SIDE for v in size):
        raise CheckpointError(
            f"{where}: {key}.image_size: {size[0]}x{size[1]} is outside 1..{MAX_SIDE} pixels per side"
        )
    channels = pre.get("channels")
    if not (_is_int(channels) and channels in CHANNELS):
        raise CheckpointError(f"{where}: {key}.channels: {channels!r} is not 1 (grayscale) or 3 (RGB)")
    for name in ("mean", "std"):
        values = pre.get(name)
        if not (isinstance(values, list) and len(values) == channels):
            raise CheckpointError(f"{where}: {key}.{name}: {values!r} is not a list of {channels} numbers")
        for i, v in enumerate(values):
            if not (_is_number(v) and math.isfinite(v)):
                raise CheckpointError(f"{where}: {key}.{name}[{i}]: {v!r} is not a finite number")
            if name == "std" and v <= 0:
                raise CheckpointError(f"{where}: {key}.std[{i}]: {v!r} is not positive")
    resize = pre.get("resize")
    if resize not in RESIZE_POLICIES:
        raise CheckpointError(f"{where}: {key}.resize: {resize!r} is not one of {', '.join(RESIZE_POLICIES)}")
    resize_to = pre.get("resize_to")
    if resize_to is not None:
        if not (_is_int(resize_to) and 1 <= resize_to <= MAX_SIDE):
            raise CheckpointError(
                f"{where}: {key}.resize_to: {resize_to!r} is not a side length 1..{MAX_SIDE}"
            )
    interpolation = pre.get("interpolation")
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise CheckpointError(
            f"{where}: {key}.interpolation: {interpolation!r} is not one of {', '.join(INTERPOLATIONS)}"
        )


def _parse(raw: str | bytes | None, where: str, kind: str) -> dict:
    if not raw:
        raise CheckpointError(f"{where}: no imgcls metadata (not an imgcls {kind})")
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: imgcls metadata is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: imgcls metadata is not a JSON object (not an imgcls {kind})")
    return meta


def _check_format(meta: dict, where: str, fmt: str, version: int, kind: str) -> None:
    if meta.get("format") != fmt:
        raise CheckpointError(f"{where}: format: {meta.get('format')!r}, not {fmt!r} (not an imgcls {kind})")
    found: Any = meta.get("version")
    if not (_is_int(found) and found >= 1):
        raise CheckpointError(f"{where}: version: {found!r} is not a version number")
    if found > version:
        raise CheckpointError(
            f"{where}: {kind} format version {found} is newer than this imgcls reads ({version}); "
            "upgrade imgcls"
        )


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def unsafe_file_reason(exc: BaseException) -> str | None:
    """Our one line for a torch file refused because it holds pickled objects
    (``torch.load(weights_only=True)``), else None. PyTorch's own message
    advises retrying with ``weights_only=False``, which would run whatever
    code the file carries; we never repeat that advice."""
    import pickle

    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return (
            "refused: it holds pickled Python objects, not only tensors and plain values, "
            "and imgcls never loads those (they can run code); use a file imgcls or torchvision wrote"
        )
    return None
