"""The data pipeline: source -> decode -> cache, then batched augmentation.

:func:`prepare_data` is the one door the trainer uses: it lists a recipe's
images (:mod:`sources`), decodes each split once into a uint8 tensor, in RAM
or memory-mapped from the disk cache (:mod:`cache`), checks the share of
unreadable files and measures mean/std (:mod:`loader`)::

    data = prepare_data(recipe.data, base_dir=recipe_dir, log=print)
    data.train.x, data.train.y  # uint8 (N, C, H, W), int64 (N,)

The trainer batches, augments (:func:`build_augment`, :func:`mix_batch`) and
normalises those tensors in its own loop (imgcls.train).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from imgcls.data.augment import build_augment, mix_batch
from imgcls.data.cache import DecodedSplit, check_bad, load_split
from imgcls.data.decode import DecodeError, decode_image, load_image
from imgcls.data.loader import compute_mean_std, normalize
from imgcls.data.shapes import cache_root, shapes_dir, write_shapes
from imgcls.data.sources import Source, open_source
from imgcls.errors import DataError
from imgcls.recipe import DataSpec

__all__ = [
    "DecodeError",
    "DecodedSplit",
    "PreparedData",
    "Source",
    "build_augment",
    "check_bad",
    "compute_mean_std",
    "decode_image",
    "default_cache_dir",
    "load_image",
    "load_split",
    "mix_batch",
    "normalize",
    "open_source",
    "prepare_data",
    "shapes_dir",
    "write_shapes",
]


@dataclass
class PreparedData:
    classes: list[str]
    train: DecodedSplit
    val: DecodedSplit
    test: DecodedSplit | None
    mean: list[float]
    std: list[float]
    bad: list[tuple[Path, str]] = field(default_factory=list)
    source: Source | None = None


def default_cache_dir() -> Path:
    """Where decoded tensors go when the caller names no folder: beside the
    shapes set, under :func:`imgcls.data.shapes.cache_root` (``$IMGCLS_CACHE``)."""
    return cache_root() / "decoded"


def prepare_data(
    spec: DataSpec,
    base_dir: str | os.PathLike = ".",
    cache_dir: str | os.PathLike | None = None,
    log=lambda message: None,
) -> PreparedData:
    """List, decode (or map from cache), check and measure a recipe's data.

    ``cache_dir`` holds the decoded tensors of ``cache: disk`` (and of
    ``auto`` for large sets); by default :func:`default_cache_dir`, so a
    second run over the same files maps them instead of decoding again.
    Raises DataError when more than ``spec.max_bad_fraction`` of all listed
    files cannot be decoded. ``mean``/``std`` come from the recipe when given,
    else are measured on the decoded training split.
    """
    start = time.perf_counter()
    source = open_source(spec, Path(base_dir))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    train = load_split(source.train, spec, cache, log)
    val = load_split(source.val, spec, cache, log)
    test = load_split(source.test, spec, cache, log) if source.test else None
    bad = train.bad + val.bad + (test.bad if test else [])
    check_bad(bad, len(source), spec.max_bad_fraction)
    if len(train) == 0:
        raise DataError(f"{source.root}: no readable training images")
    if spec.mean is not None and spec.std is not None:
        mean, std = list(spec.mean), list(spec.std)
    else:
        mean, std = compute_mean_std(train.x)
        mean = list(spec.mean) if spec.mean is not None else mean
        std = list(spec.std) if spec.std is not None else std
    h, w = spec.size
    log(
        f"data: {len(source.classes)} classes, {len(train)} train, {len(val)} val"
        + (f", {len(test)} test" if test else "")
        + f" images at {spec.channels}x{h}x{w}"
        + (f", {len(bad)} unreadable skipped" if bad else "")
        + f" ({time.perf_counter() - start:.1f} s)"
    )
    return PreparedData(source.classes, train, val, test, mean, std, bad, source)
