"""Batches from a decoded uint8 tensor, and the preprocessing a model carries.

:class:`Batches` is the whole training-time loader: shuffle with a generator,
index the uint8 tensor, move to the device, augment, convert, normalise. No
worker processes: the data is already decoded and augmentation is batched.

The ``preprocessing`` dict (image size, channels, mean, std, resize policy)
travels inside checkpoints so that predict and evaluate decode and normalise
exactly as training did; :func:`load_files` is that path for predict.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from imgcls.data.augment import Augment, mix_batch, to_float
from imgcls.data.cache import decode_into
from imgcls.errors import DataError
from imgcls.recipe import DataSpec

MIN_STD = 1e-3  # a constant channel would otherwise divide by zero


def compute_mean_std(x: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 (N, C, H, W) tensor, in [0, 1] units.

    Accumulated in float64 over chunks, so a memory-mapped cache is streamed
    rather than converted to float all at once.
    """
    if x.ndim != 4 or x.shape[0] == 0:
        raise DataError("cannot compute mean/std: the training set is empty")
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.float64)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / n
    var = (total_sq / n - mean.square()).clamp(min=0)
    std = var.sqrt() / 255
    return (mean / 255).tolist(), std.clamp(min=MIN_STD).tolist()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) batch -> float ``(x - mean) / std``."""
    x = to_float(x)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - m) / s


class Batches:
    """Iterate ``(x, y)`` batches over a decoded split.

    ``x`` comes out float, augmented (when ``augment`` is given) and
    normalised, on ``device``, optionally channels_last. ``y`` is int64 class
    indices, or float soft targets (B, num_classes) when mixup/cutmix is on
    (which needs ``num_classes``). Each pass draws a new order from
    ``generator``, so epochs differ but a seeded run repeats exactly.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        augment: Augment | None = None,
        drop_last: bool = False,
        channels_last: bool = False,
        device: torch.device | str | None = None,
        num_classes: int | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
    ):
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
        if (mixup_alpha > 0 or cutmix_alpha > 0) and not num_classes:
            raise ValueError("mixup/cutmix need num_classes")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.mean, self.std = list(mean), list(std)
        self.shuffle, self.augment = shuffle, augment
        self.generator = generator if generator is not None else torch.Generator()
        self.drop_last, self.channels_last = drop_last, channels_last
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.num_classes = num_classes
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha

    def __len__(self) -> int:
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.x)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator)
        else:
            order = torch.arange(n)
        pin = self.device.type == "cuda"
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.shuffle:
                xb, yb = self.x[idx], self.y[idx]
            else:  # contiguous slice: no gather copy from a memory map
                xb = self.x[b * self.batch_size : (b + 1) * self.batch_size]
                yb = self.y[b * self.batch_size : (b + 1) * self.batch_size]
            if pin:
                xb = xb.pin_memory()
            xb = xb.to(self.device, non_blocking=pin)  # uint8: 4x less to copy
            yb = yb.to(self.device, non_blocking=pin)
            if self.augment is not None:
                xb = self.augment(xb, self.generator)
            if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
                xb, yb = mix_batch(
                    to_float(xb),
                    yb,
                    self.num_classes,  # type: ignore[arg-type]
                    self.mixup_alpha,
                    self.cutmix_alpha,
                    self.generator,
                )
            xb = normalize(xb, self.mean, self.std)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yield xb, yb


def make_preprocessing(spec: DataSpec, mean: Sequence[float], std: Sequence[float]) -> dict:
    """What a checkpoint must carry to decode and normalise like training did."""
    h, w = spec.size
    return {
        "image_size": [h, w],
        "channels": spec.channels,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "resize": spec.resize,
    }


def load_files(
    paths: Sequence[str | os.PathLike], preprocessing: dict
) -> tuple[torch.Tensor, list[Path], list[tuple[Path, str]]]:
    """Decode and normalise files for predict.

    Returns ``(x, ok_paths, failures)``: x is float (N_ok, C, H, W) in the
    order of ``ok_paths``; each failure is ``(path, reason)``. Never raises for
    a bad file, so one broken photo does not stop a batch of predictions.
    """
    h, w = preprocessing["image_size"]
    channels = int(preprocessing["channels"])
    paths = [Path(p) for p in paths]
    x = torch.empty((len(paths), channels, h, w), dtype=torch.uint8)
    failures = decode_into(x, paths, channels, (h, w), preprocessing["resize"])
    bad = {i for i, _ in failures}
    ok = [i for i in range(len(paths)) if i not in bad]
    x = normalize(x[ok], preprocessing["mean"], preprocessing["std"])
    return x, [paths[i] for i in ok], [(paths[i], reason) for i, reason in failures]
