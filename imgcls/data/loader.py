"""Normalisation statistics: the per-channel mean and std of a decoded split
(the one ``(x - mean) / std`` that applies them is :func:`imgcls.forward.normalize`).

The mean and std travel inside checkpoints (``preprocessing``) so that every
consumer feeds the model exactly as training did.
"""

from __future__ import annotations

import numpy as np
import torch

from imgcls.data.decode import channel_sums
from imgcls.errors import DataError

MIN_STD = 1e-3  # a constant channel would otherwise divide by zero


def compute_mean_std(x: torch.Tensor, chunk: int = 4096) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of a uint8 (N, C, H, W) tensor, in [0, 1] units.

    Accumulated exactly in integers over chunks (a memory-mapped cache is
    streamed, not converted to float all at once).
    """
    if x.ndim != 4 or x.shape[0] == 0:
        raise DataError("cannot compute mean/std: the training set is empty")
    return mean_std_from_sums(channel_sums(x.numpy(), chunk), x.shape[0] * x.shape[2] * x.shape[3])


def mean_std_from_sums(sums: np.ndarray, pixels: int) -> tuple[list[float], list[float]]:
    """Mean and std in [0, 1] units from :func:`channel_sums` over ``pixels``
    pixels per channel (a cache entry keeps the sums: no pixel is read)."""
    if pixels <= 0:
        raise DataError("cannot compute mean/std: the training set is empty")
    total = torch.tensor(sums[0], dtype=torch.float64)
    total_sq = torch.tensor(sums[1], dtype=torch.float64)
    mean = total / pixels
    var = (total_sq / pixels - mean.square()).clamp(min=0)
    std = var.sqrt() / 255
    return (mean / 255).tolist(), std.clamp(min=MIN_STD).tolist()
