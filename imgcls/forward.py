"""The one forward path: uint8 pixels -> normalised input -> model -> logits.

Everything that runs a model on images goes through here: validation during
training, evaluate, predict, explain, the export parity checks. So a picture
is fed to a network the same way wherever it is fed::

    x = model_input(pixels, mean, std, device=device, channels_last=True)
    scores = logits(model, x, dtype=torch.bfloat16)          # float32 (N, K)

    for rows, scores in tensor_logits(model, pixels, mean, std, batch_size=256):
        ...                                                   # rows: a slice of pixels

A leaf: it imports torch alone (nothing of imgcls), so predict, export,
validation, explain and the data checks can all use it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence

import torch

Forward = Callable[[torch.Tensor], object]  # an nn.Module, or any callable on a batch


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float 0..1 (float input is returned as is)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (0..255) or float (0..1) batch -> float ``(x - mean) / std``."""
    x = to_float(x)
    m, s = _channel_stats(tuple(mean), tuple(std), x.dtype, x.device)
    return (x - m) / s


@functools.lru_cache(maxsize=32)
def _channel_stats(mean: tuple, std: tuple, dtype: torch.dtype, device: torch.device) -> tuple:
    """``mean`` and ``std`` as (1, C, 1, 1) tensors on ``device``, made once:
    built per batch, each was a host-to-device copy, which on CUDA waits for
    the stream (a host sync in every training step). Made outside inference
    mode, so a later backward (training, Grad-CAM) may save them."""
    with torch.inference_mode(False):
        m = torch.tensor(mean, dtype=dtype, device=device).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=dtype, device=device).view(1, -1, 1, 1)
    return m, s


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
