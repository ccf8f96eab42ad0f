"""Normalisation: the per-channel statistics of a decoded split, and the one
``(x - mean) / std`` that evaluate, predict and export apply.

The mean and std travel inside checkpoints (``preprocessing``) so that every
consumer feeds the model exactly as training did.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from imgcls.data.augment import to_float
from imgcls.errors import DataError

MIN_STD = 1e-3  # a constant channel would otherwise divide by zero


def compute_mean_std(x: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 (N, C, H, W) tensor, in [0, 1] units.

    Accumulated exactly in integers over chunks (a memory-mapped cache is
    streamed, not converted to float all at once; int32 squares are ~2x
    faster than float64 ones, and a chunk's sums cannot overflow int64).
    """
    if x.ndim != 4 or x.shape[0] == 0:
        raise DataError("cannot compute mean/std: the training set is empty")
    c = x.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.int32)
        total += part.sum(dim=(0, 2, 3), dtype=torch.int64).to(torch.float64)
        total_sq += part.square().sum(dim=(0, 2, 3), dtype=torch.int64).to(torch.float64)
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
