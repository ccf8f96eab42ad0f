"""The one inference path: uint8 pixels -> normalised input -> model -> logits.

Everything that runs a model on images goes through here: validation during
training, evaluate, predict, the export parity checks. So a picture is fed
to a network the same way wherever it is fed::

    x = model_input(pixels, mean, std, device=device, channels_last=True)
    scores = logits(model, x, dtype=torch.bfloat16)          # float32 (N, K)

    for rows, scores in tensor_logits(model, pixels, mean, std, batch_size=256):
        ...                                                   # rows: a slice of pixels

Files come in through :func:`load_input` (the one decode + resize of a file
for a model, torchvision's resize-then-centre-crop for published weights)
and :func:`decoded_batches` (a thread pool one batch ahead of the model);
:func:`load_predictor` opens any model kind (checkpoint, exported file,
published torchvision weights) as one :class:`Predictor`.

This module never imports model code (``imgcls.models``) at import time:
predicting with an exported ONNX file must not build a torch model.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from imgcls.data.cache import decode_threads
from imgcls.data.decode import DecodeError, decode_image, image_to_tensor, load_image
from imgcls.data.loader import normalize
from imgcls.errors import CheckpointError, UsageError

Forward = Callable[[torch.Tensor], object]  # an nn.Module, or any callable on a batch
Log = Callable[[str], None]
EXPORTED_SUFFIXES = (".onnx", ".pt", ".ts")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main_logits(output) -> torch.Tensor:
    """The class scores of a model's output: torchvision's aux-head namedtuples
    (``.logits``), tuples (first element) and plain tensors alike."""
    if isinstance(output, torch.Tensor):
        return output
    return output.logits if hasattr(output, "logits") else output[0]


def model_input(
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    device: torch.device | str | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """A uint8 (0..255) or float (0..1) NCHW batch as the model's input:
    moved to ``device``, ``(x - mean) / std`` in float32, optionally NHWC in memory."""
    if device is not None:
        x = x.to(device, non_blocking=True)
    x = normalize(x, mean, std)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def logits(forward: Forward, x: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``forward(x)``'s class scores as float32, under autocast when ``dtype``
    is a reduced precision. ``x`` is a batch from :func:`model_input`."""
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
        return main_logits(forward(x)).float()


def tta_logits(forward: Forward, x: torch.Tensor, *, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Test-time augmentation: the mean of the logits of ``x`` and of ``x``
    flipped left-right (a batch from :func:`model_input`; flipping commutes
    with the normalisation).

    Only the flip: the input is already the model's size (resized or centre-
    cropped as in training), so a crop would have to be scaled back up and
    show the network objects at a size it did not train on. Two forward
    passes rather than one of twice the batch, so an export with a fixed
    batch size takes them too. Averaging logits (not probabilities) keeps
    one rule for softmax and sigmoid heads.
    """
    plain = logits(forward, x, dtype=dtype)
    flipped = logits(forward, x.flip(-1), dtype=dtype)
    return (plain + flipped) / 2


def predict_scores(predictor: Predictor, logits_: torch.Tensor) -> torch.Tensor:
    """Logits -> probabilities: softmax over classes (single label), or one
    sigmoid per class (multi-label: each label on its own)."""
    if predictor.task == "multilabel":
        return torch.sigmoid(logits_)
    return torch.softmax(logits_, dim=1)


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


def tensor_logits(
    forward: Forward,
    x: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """Logits of a decoded uint8 set, batch by batch: ``(rows, logits)``.

    The caller puts a module in eval mode; gradients are off here. Nothing
    is read back to the host: logits stay on ``device``.
    """
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            rows = slice(start, min(start + batch_size, len(x)))
            xb = model_input(x[rows], mean, std, device=device, channels_last=channels_last)
            yield rows, logits(forward, xb, dtype=dtype)


# --------------------------------------------------------------------------- files


def load_input(path: str | os.PathLike, preprocessing: dict) -> torch.Tensor:
    """One file as uint8 (C, H, W), decoded and resized as ``preprocessing`` says."""
    channels = int(preprocessing["channels"])
    size = tuple(preprocessing["image_size"])
    if preprocessing.get("resize_to"):
        im = decode_image(path, channels)
        im = _resize_shorter(
            im, int(preprocessing["resize_to"]), preprocessing.get("interpolation", "bilinear")
        )
        return image_to_tensor(_center_crop(im, size))
    return load_image(path, channels, size, preprocessing["resize"])  # type: ignore[arg-type]


def _resize_shorter(im, size: int, interpolation: str):
    """torchvision ``F.resize(img, [size])`` on a PIL image: shorter side to ``size``."""
    from PIL import Image

    resample = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }.get(interpolation, Image.Resampling.BILINEAR)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return im
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return im.resize((new_w, new_h), resample)


def _center_crop(im, size: tuple[int, int]):
    """torchvision ``F.center_crop`` on a PIL image (pads with black when too small)."""
    from PIL import Image

    crop_h, crop_w = size
    w, h = im.size
    if crop_w > w or crop_h > h:
        canvas = Image.new(im.mode, (max(w, crop_w), max(h, crop_h)), 0)
        canvas.paste(im, ((max(w, crop_w) - w) // 2, (max(h, crop_h) - h) // 2))
        im, (w, h) = canvas, canvas.size
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return im.crop((left, top, left + crop_w, top + crop_h))


def decoded_batches(
    paths: Sequence[Path], preprocessing: dict, batch_size: int, threads: int | None = None
) -> Iterator[list[torch.Tensor | DecodeError]]:
    """Per batch, each file's uint8 tensor or its DecodeError, in input order.

    Decoding runs on a thread pool one batch ahead of the consumer (PIL and
    torch release the GIL), so the model and the decoder overlap.
    """

    def one(path: Path) -> torch.Tensor | DecodeError:
        try:
            return load_input(path, preprocessing)
        except DecodeError as exc:
            return exc

    with ThreadPoolExecutor(threads or decode_threads()) as pool:
        pending: deque[list[Future]] = deque()
        starts = iter(range(0, len(paths), batch_size))

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append([pool.submit(one, p) for p in paths[start : start + batch_size]])

        submit_next()
        submit_next()
        while pending:
            batch = pending.popleft()
            submit_next()
            yield [f.result() for f in batch]


# --------------------------------------------------------------------------- models


@dataclass
class Predictor:
    classes: list[str]
    preprocessing: dict
    forward: Forward  # normalised float NCHW -> model output (see main_logits)
    source: str  # what was loaded, for the log
    task: str = "single"  # or "multilabel": a sigmoid per class, a label on at its threshold
    thresholds: list[float] | None = None  # multi-label: per class (0.5 unless tuned)

    def batch_logits(self, x_uint8: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
        """A decoded uint8 batch through the model (with test-time augmentation when ``tta``)."""
        x = model_input(x_uint8, self.preprocessing["mean"], self.preprocessing["std"])
        return tta_logits(self.forward, x) if tta else logits(self.forward, x)


def _task_fields(meta: dict) -> dict:
    from imgcls.metadata import task_of, thresholds_of

    task = task_of(meta)
    return {"task": task, "thresholds": thresholds_of(meta) if task == "multilabel" else None}


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
