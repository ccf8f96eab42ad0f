"""prepare_data: list, decode (or map from the cache), check and measure a recipe's data."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgcls.data.batch_decode import DecodePool
from imgcls.data.cache import DecodedSplit, check_bad, default_cache_dir, evict, load_split
from imgcls.data.loader import compute_mean_std, mean_std_from_sums
from imgcls.data.progress import Progress
from imgcls.data.sources import Source, open_source
from imgcls.errors import DataError
from imgcls.recipe import DataSpec


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
    progress: Progress | None = None,
) -> PreparedData:
    """List, decode (or map from cache), check and measure a recipe's data.

    ``cache_dir`` holds the persistent decoded cache (see :mod:`imgcls.data.cache`);
    by default :func:`default_cache_dir`, so a second run over the same files
    maps them instead of decoding again. ``progress``: by default a bar on
    stderr when it is a terminal, else a plain line through ``log`` every few
    seconds of a long step.
    Raises DataError when more than ``spec.max_bad_fraction`` of all listed
    files cannot be decoded. ``mean``/``std`` come from the recipe when given,
    else are measured on the decoded training split.
    """
    start = time.perf_counter()
    progress = progress or Progress.auto(log)
    with progress.task("listing") as task:
        source = open_source(spec, Path(base_dir), task, log)
    listed = time.perf_counter() - start
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with DecodePool() as pool:  # one pool of decode workers for every split
        # notes said once per run; eviction once every split is built (and held)
        where: dict[str, Any] = dict(stats=source.stats, source=source.root, progress=progress, pool=pool)
        where.update(notes=set(), evicting=False)
        train = load_split(source.train, spec, cache, log, split="train", **where)
        val = load_split(source.val, spec, cache, log, split="val", **where)
        test = load_split(source.test, spec, cache, log, split="test", **where) if source.test else None
    if spec.cache != "none":
        evict(cache, log)
    source.stats = {}  # only the cache key needed them: ~250 bytes a file, for the whole run
    # multi-label rows with an empty label cell: a negative for every class
    unlabelled = (
        sum(1 for split in (source.train, source.val, source.test) for _, y in split if not any(y))
        if source.task == "multilabel"
        else 0
    )
    bad = train.bad + val.bad + (test.bad if test else [])
    check_bad(bad, len(source), spec.max_bad_fraction)
    if len(train) == 0:
        raise DataError(f"{source.root}: no readable training images")
    if spec.mean is not None and spec.std is not None:
        mean, std = list(spec.mean), list(spec.std)
    else:
        if train.sums is not None:  # kept with the decoded rows: nothing to read
            mean, std = mean_std_from_sums(train.sums, len(train) * train.x.shape[2] * train.x.shape[3])
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
        + (f", {unlabelled} with no label (a negative for every class)" if unlabelled else "")
        + f" ({time.perf_counter() - start:.1f} s, listing {listed:.1f} s)"
    )
    return PreparedData(source.classes, train, val, test, mean, std, bad, source)
