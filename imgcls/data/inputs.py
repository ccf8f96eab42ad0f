"""Files in, uint8 tensors out, as a model's preprocessing says.

:func:`load_input` is the one decode + resize of a file for a model
(torchvision's resize-then-centre-crop for published weights);
:func:`decoded_batches` runs it on a thread pool one batch ahead of the model.
Used by predict, evaluate, explain and the export checks; no training code.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from imgcls.data.decode import (
    DecodeError,
    decode_bytes,
    decode_image,
    decode_workers,
    image_to_tensor,
    resize_image,
)


def load_input(path: str | os.PathLike, preprocessing: dict) -> torch.Tensor:
    """One file as uint8 (C, H, W), decoded and resized as ``preprocessing`` says."""
    return _prepared(lambda channels, min_side: decode_image(path, channels, min_side), preprocessing)


def load_input_bytes(data: bytes, preprocessing: dict, name: str = "upload") -> torch.Tensor:
    """:func:`load_input` on an image already in memory (an HTTP upload): the
    same decode (:func:`imgcls.data.decode.decode_bytes`) and resize; no file is opened."""
    return _prepared(lambda channels, min_side: decode_bytes(data, channels, min_side, name), preprocessing)


def _prepared(decode, preprocessing: dict) -> torch.Tensor:
    """``decode(channels, min_side)`` resized as ``preprocessing`` says, as uint8 (C, H, W)."""
    channels = int(preprocessing["channels"])
    size = tuple(preprocessing["image_size"])
    if preprocessing.get("resize_to"):
        im = decode(channels, None)
        im = _resize_shorter(
            im, int(preprocessing["resize_to"]), preprocessing.get("interpolation", "bilinear")
        )
        return image_to_tensor(_center_crop(im, size))
    im = decode(channels, max(size))
    return image_to_tensor(resize_image(im, size, preprocessing["resize"]))


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

    with ThreadPoolExecutor(threads or decode_workers()) as pool:
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
