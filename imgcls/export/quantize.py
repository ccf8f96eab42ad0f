"""int8 ONNX exports: static quantization, kept only past an accuracy gate.

``imgcls export RUN --format onnx --quantize int8`` first writes and checks
the float32 ONNX file as any export (parity with PyTorch), then:

1. calibrates on ``--calibrate N`` images of the run's own training split
   (a seeded sample), decoded and normalised exactly as the export expects
   (:func:`imgcls.data.inputs.load_input`, :func:`imgcls.forward.model_input`);
2. quantizes it with ONNX Runtime's static quantization: QDQ format,
   per-channel int8 weights, uint8 activations (min/max of the calibration
   activations), and only the operator types that keep accuracy
   (:data:`QUANT_OPS`: Conv, Gemm, MatMul; Ultralytics got 0 mAP when every
   operator was quantized and then limited it to these), after ONNX
   Runtime's own pre-processing (shape inference, Conv + BatchNorm folding);
3. gates it: float32 and int8 files run on the run's validation split (else
   its test split); the report is the accuracy of each (single-label: top-1;
   multi-label: the exact-match ratio at the model's thresholds, evaluate's
   ``accuracy``) and the share of images on which int8 decides exactly as
   float32 does. A drop of more than ``max_drop`` points is refused (exit 1,
   nothing written) unless ``force``, which keeps the file with a warning.

The int8 file carries the float32 export's metadata (classes, preprocessing,
task, thresholds) plus a ``quantization`` document with these facts and the
gate's numbers, so predict (and anything that loads exports through
:mod:`imgcls.export.runtime`) runs it like any other ONNX export.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from imgcls.errors import DataError, ImgclsError, UsageError
from imgcls.export.runtime import META_KEY, load_exported

QUANT_OPS = ("Conv", "Gemm", "MatMul")
QUANTIZE_CHOICES = ("int8",)
DEFAULT_CALIBRATE = 300  # images; min/max calibration settles well before that on small nets
DEFAULT_MAX_DROP = 1.0  # accuracy points
MAX_GATE_IMAGES = 5000  # the held-out images the gate runs at most (a seeded sample beyond)
GATE_BATCH = 32
STRIDE = 4  # calibration batches whose activations are held at once
SEED = 0

Log = Callable[[str], None]
RunImages = tuple[list, list, str, str]  # calibration items, held-out items, split name, task


@dataclass
class Gate:
    """The int8 file against the float32 one on the run's held-out images."""

    metric: str  # "top-1 accuracy" or "exact-match" (multi-label)
    split: str  # "val" or "test"
    images: int
    fp32: float  # the metric, 0..1
    int8: float
    drop: float  # accuracy points lost (fp32 - int8) * 100; negative when int8 is better
    agreement: float  # share of images where int8 decides exactly as fp32 (top-1, or the label set)
    max_drop: float
    passed: bool
    forced: bool = False

    def line(self) -> str:
        return (
            f"int8 gate on {self.images} {self.split} images: {self.metric} {self.fp32:.2%} fp32 -> "
            f"{self.int8:.2%} int8 ({-self.drop:+.2f} points, allowed -{self.max_drop:g}); "
            f"agrees with fp32 on {self.agreement:.2%}"
        )


def check_quantize_options(
    fmt: str, quantize: str | None, calibrate: int | None, max_drop: float | None
) -> tuple[int, float]:
    """Refuse bad combinations up front (exit 2); the calibration size and allowed drop."""
    if quantize is None:
        if calibrate is not None:
            raise UsageError("--calibrate applies to --quantize int8 only")
        if max_drop is not None:
            raise UsageError("--max-drop applies to --quantize int8 only")
        return 0, DEFAULT_MAX_DROP
    if quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"unknown --quantize '{quantize}'; choose {', '.join(QUANTIZE_CHOICES)}")
    if fmt != "onnx":
        raise UsageError(f"--quantize int8 applies to --format onnx only, not {fmt}")
    if calibrate is not None and calibrate < 1:
        raise UsageError(f"--calibrate {calibrate}: give at least 1 image")
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise UsageError(f"--max-drop {max_drop}: give the accuracy points int8 may lose, 0 or more")
    return (
        DEFAULT_CALIBRATE if calibrate is None else calibrate,
        DEFAULT_MAX_DROP if max_drop is None else max_drop,
    )


def quantize_checked(
    ckpt,
    fp32_path: Path,
    out: Path,
    meta: dict,
    *,
    images: RunImages,
    max_drop: float,
    force: bool,
    batch_size: int | None,
    log: Log,
) -> dict:
    """Quantize the checked float32 export ``fp32_path``, gate it, and write
    the int8 file to ``out`` (only if it passes, or with ``force``).

    ``images``: :func:`run_images` of the checkpoint (listed before the
    export, so a run whose images are missing is refused before any work).
    ``batch_size``: a static export's fixed batch size (None: a free axis).
    Returns the ``quantization`` document stored in the file (gate included).
    """
    from imgcls import interrupts

    train, held, split, task = images
    log(f"calibrating int8 on {len(train)} images of the run's training split")
    x = _inputs(ckpt.preprocessing, [p for p, _ in train])
    if x is None:
        raise DataError(f"{ckpt.path}: none of the {len(train)} calibration images could be read")
    interrupts.check()
    facts: dict[str, Any] = {
        "dtype": "int8",
        "method": "onnxruntime static quantization",
        "format": "QDQ",
        "weights": "int8, per channel",
        "activations": "uint8, per tensor (min/max calibration)",
        "ops": list(QUANT_OPS),
        "calibration_images": len(x),
        "calibration_split": "train",
    }
    with tempfile.TemporaryDirectory(prefix="imgcls-int8-") as work:
        q_path = Path(work) / "model.int8.onnx"
        quantize_onnx(fp32_path, q_path, x, batch_size, Path(work))
        interrupts.check()
        log(f"checking int8 against float32 on the run's {split} split ({len(held)} images)")
        gate = run_gate(load_exported(fp32_path, kind="onnx"), q_path, meta, held, split, task, max_drop)
        gate.forced = force and not gate.passed
        facts["gate"] = asdict(gate)
        _write_meta(q_path, {**meta, "quantization": facts})
        if load_exported(q_path, kind="onnx").meta != {**meta, "quantization": facts}:
            raise ImgclsError("the int8 export lost its metadata on reload; nothing was written")
        if not gate.passed and not force:
            raise ImgclsError(
                f"{gate.line()}: the drop is over --max-drop {max_drop:g}; nothing was written "
                "(--force keeps it)"
            )
        if not gate.passed:
            log(f"warning: {gate.line()}: over --max-drop {max_drop:g}, kept because of --force")
        interrupts.check()
        shutil.copyfile(q_path, out)
    return facts


def quantize_onnx(fp32_path: Path, out: Path, x, batch_size: int | None, work: Path) -> None:
    """ONNX Runtime's static quantization of ``fp32_path`` calibrated on the
    normalised images ``x`` (N, C, H, W) -> ``out`` (no metadata of its own)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from imgcls.export.runtime import INPUT_NAME

    size = batch_size or 16
    index = [i % len(x) for i in range(-(-len(x) // size) * size)] if batch_size else list(range(len(x)))
    batches = [x[index[i : i + size]].numpy() for i in range(0, len(index), size)]

    class Reader(CalibrationDataReader):
        """The batches, fed a stride at a time (ONNX Runtime's CalibStridedMinMax
        merges the ranges of each stride, so the activations of only one stride
        are held at once: 300 images of a 224 px resnet18 at once take ~3 GB)."""

        def __init__(self) -> None:
            self._batches: Iterator = iter(batches)

        def __len__(self) -> int:
            return len(batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._batches = iter(batches[start_index:end_index])

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {INPUT_NAME: batch}

    stride = max(d for d in range(1, STRIDE + 1) if len(batches) % d == 0)
    pre = work / "model.pre.onnx"
    try:
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
    except Exception:  # symbolic shape inference is best-effort; ONNX's own still runs
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANT_OPS),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            # not CalibMaxIntermediateOutputs: onnxruntime 1.32 drops those batches unmeasured
            extra_options={"CalibStridedMinMax": stride},
        )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImgclsError(f"onnxruntime cannot quantize this model ({first[:300]})") from None


def run_gate(fp32, q_path: Path, meta: dict, held, split: str, task: str, max_drop: float) -> Gate:
    """Accuracy of the float32 export ``fp32`` and of the int8 file on ``held``."""
    import torch

    from imgcls.metadata import thresholds_of

    int8 = load_exported(q_path, kind="onnx")
    paths = [p for p, _ in held]
    outs: list[tuple[Any, Any]] = []
    kept: list[int] = []
    for start in range(0, len(paths), 256):
        x, ok = _inputs(meta["preprocessing"], paths[start : start + 256], with_rows=True)
        if x is None:
            continue
        kept += [start + i for i in ok]
        for i in range(0, len(x), GATE_BATCH):
            outs.append((fp32(x[i : i + GATE_BATCH]), int8(x[i : i + GATE_BATCH])))
    if not kept:
        raise DataError(f"none of the {len(held)} {split} images could be read for the int8 gate")
    a = torch.cat([o[0] for o in outs]).double()
    b = torch.cat([o[1] for o in outs]).double()
    labels = [held[i][1] for i in kept]
    if task == "multilabel":
        t = torch.tensor(thresholds_of(meta), dtype=torch.float64)
        target = torch.tensor(labels, dtype=torch.bool)
        da, db = a.sigmoid() >= t, b.sigmoid() >= t
        fp32_acc = float((da == target).all(1).double().mean())
        int8_acc = float((db == target).all(1).double().mean())
        agree = float((da == db).all(1).double().mean())
        metric = "exact-match"
    else:
        target_i = torch.tensor(labels, dtype=torch.int64)
        fp32_acc = float((a.argmax(1) == target_i).double().mean())
        int8_acc = float((b.argmax(1) == target_i).double().mean())
        agree = float((a.argmax(1) == b.argmax(1)).double().mean())
        metric = "top-1 accuracy"
    drop = round((fp32_acc - int8_acc) * 100, 4)
    return Gate(metric, split, len(kept), fp32_acc, int8_acc, drop, agree, max_drop, drop <= max_drop + 1e-9)


def run_images(ckpt, calibrate: int) -> RunImages:
    """(calibration items, held-out items, held-out split name, task) of the
    checkpoint's run, labels as model class indices (multi-hot rows for multi-label);
    a one-line error (exit 2) when the run's images are not there."""
    from imgcls.data.sources import open_source

    base = ckpt.run_dir or ckpt.path.parent
    try:
        source = open_source(ckpt.recipe.data, base)
    except ImgclsError as exc:
        raise DataError(
            f"int8 export needs the run's images (training split to calibrate, validation split to "
            f"check): {exc}"
        ) from None
    if not source.train:
        raise DataError(f"{ckpt.path}: the run's training split is empty; int8 calibration needs its images")
    split, held = ("val", source.val) if source.val else ("test", source.test)
    if not held:
        raise UsageError(
            f"{ckpt.path}: the run has no validation or test split (data.val_split is 0), so the int8 "
            "accuracy gate has nothing to measure"
        )
    index = {name: i for i, name in enumerate(ckpt.classes)}
    unknown = sorted(set(source.classes) - set(index))
    if unknown:
        raise DataError(f"{ckpt.path}: the run's data has classes the model lacks: {', '.join(unknown)}")
    to_model = [index[name] for name in source.classes]

    def relabel(label):
        if source.task != "multilabel":
            return to_model[label]
        hot = [0] * len(ckpt.classes)
        for j, bit in enumerate(label):
            if bit:
                hot[to_model[j]] = 1
        return hot

    rng = random.Random(SEED)
    train = rng.sample(list(source.train), min(calibrate, len(source.train)))
    held = rng.sample(list(held), min(MAX_GATE_IMAGES, len(held)))
    task = "multilabel" if source.task == "multilabel" else "single"
    return [(p, None) for p, _ in train], [(p, relabel(y)) for p, y in held], split, task


def _inputs(preprocessing: dict, paths: Sequence[Path], with_rows: bool = False):
    """The files decoded, resized and normalised as the export expects
    (float32 N x C x H x W); unreadable ones skipped. None when none could be read."""
    import torch

    from imgcls.data.inputs import decoded_batches
    from imgcls.forward import model_input

    good, rows = [], []
    done = 0
    for results in decoded_batches(list(paths), preprocessing, 64):
        for i, r in enumerate(results):
            if isinstance(r, torch.Tensor):
                good.append(r)
                rows.append(done + i)
        done += len(results)
    if not good:
        return (None, []) if with_rows else None
    x = model_input(torch.stack(good), preprocessing["mean"], preprocessing["std"]).float()
    return (x, rows) if with_rows else x


def _write_meta(path: Path, meta: dict) -> None:
    """Replace the ONNX file's metadata with the imgcls document ``meta``."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    proto.producer_name = "imgcls"
    onnx.save(proto, str(path))


def default_int8_out(fp32_out: Path) -> Path:
    """``model.onnx`` -> ``model.int8.onnx``."""
    return fp32_out.with_name(f"{fp32_out.stem}.int8{fp32_out.suffix}")
