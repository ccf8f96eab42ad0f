"""The data pipeline: source -> decode -> cache -> (augment, batches).

:func:`prepare_data` is the one door the trainer uses::

    data = prepare_data(recipe.data, base_dir=recipe_dir, cache_dir=cache, log=print)
    train = Batches(data.train.x, data.train.y, 64, mean=data.mean, std=data.std,
                    shuffle=True, generator=g, augment=build_augment(recipe.data.augment))
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from imgcls.data.augment import build_augment, mix_batch
from imgcls.data.cache import DecodedSplit, check_bad, load_split
from imgcls.data.decode import DecodeError, decode_image, load_image
from imgcls.data.loader import (
    Batches,
    compute_mean_std,
    load_files,
    make_preprocessing,
    normalize,
)
from imgcls.data.shapes import shapes_dir, write_shapes
from imgcls.data.sources import Source, open_source
from imgcls.errors import DataError
from imgcls.recipe import DataSpec

__all__ = [
    "Batches",
    "DecodeError",
    "DecodedSplit",
    "PreparedData",
    "Source",
    "build_augment",
    "check_bad",
    "compute_mean_std",
    "decode_image",
    "load_files",
    "load_image",
    "load_split",
    "make_preprocessing",
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


def prepare_data(
    spec: DataSpec,
    base_dir: str | os.PathLike = ".",
    cache_dir: str | os.PathLike | None = None,
    log=lambda message: None,
) -> PreparedData:
    """List, decode (or map from cache), check and measure a recipe's data.

    Raises DataError when more than ``spec.max_bad_fraction`` of all listed
    files cannot be decoded. ``mean``/``std`` come from the recipe when given,
    else are measured on the decoded training split.
    """
    start = time.perf_counter()
    source = open_source(spec, Path(base_dir))
    cache = Path(cache_dir) if cache_dir is not None else None
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
