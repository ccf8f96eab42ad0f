"""Decode once: a split becomes one uint8 tensor (N, C, H, W) at the recipe size.

``cache`` policy (``data.cache``):

- ``ram``: decode into memory; nothing written.
- ``disk``: decode into a memory-mapped file under ``cache_dir``, keyed by a
  hash of the file list (path, size, mtime), target size, channels and resize
  policy; a later run with the same key maps it instead of decoding. The file
  is written under a temporary name and renamed, with a small JSON sidecar
  written last, so a crash never leaves a cache that looks complete.
- ``auto``: ``ram`` below :data:`AUTO_RAM_LIMIT` bytes, else ``disk``.
- ``none``: like ``ram``.

Files that fail to decode are skipped, reported through ``log`` and returned
in ``DecodedSplit.bad``; :func:`check_bad` enforces ``max_bad_fraction``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgcls.data.decode import DecodeError, load_image
from imgcls.errors import DataError
from imgcls.recipe import DataSpec

AUTO_RAM_LIMIT = 2 * 1024**3
CACHE_VERSION = 2  # bump when decode/resize output changes (2: JPEG draft decoding)
Log = Callable[[str], None]
MAX_LOGGED_BAD = 10


@dataclass
class DecodedSplit:
    x: torch.Tensor  # uint8 (N, C, H, W); may be backed by a memory-mapped file
    y: torch.Tensor  # int64 (N,)
    files: list[Path]
    bad: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)


def decode_threads() -> int:
    """Threads for decoding: PIL releases the GIL while decoding and resizing."""
    return max(1, min(8, os.cpu_count() or 1))


def decode_into(
    out: np.ndarray | torch.Tensor,
    paths: Sequence[Path],
    channels: int,
    size: tuple[int, int],
    resize: str,
    threads: int | None = None,
) -> list[tuple[int, str]]:
    """Decode ``paths[i]`` into ``out[i]``; return ``(index, reason)`` failures."""

    def one(i: int) -> tuple[int, str] | None:
        try:
            t = load_image(paths[i], channels, size, resize)  # type: ignore[arg-type]
        except DecodeError as exc:
            return i, exc.reason
        out[i] = t.numpy() if isinstance(out, np.ndarray) else t
        return None

    threads = threads or decode_threads()
    if threads == 1 or len(paths) < 2:
        results = map(one, range(len(paths)))
        return [r for r in results if r is not None]
    with ThreadPoolExecutor(threads) as pool:
        return [r for r in pool.map(one, range(len(paths)), chunksize=16) if r is not None]


def cache_key(paths: Sequence[Path], spec: DataSpec) -> str:
    """Hash of what the decoded tensor depends on: files and target geometry."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, spec.size, spec.channels, spec.resize]).encode())
    for p in paths:
        try:
            st = os.stat(p)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"\0{os.path.abspath(p)}\0{stamp}".encode())
    return h.hexdigest()[:24]


def load_split(
    items: Sequence[tuple[Path, int]],
    spec: DataSpec,
    cache_dir: str | os.PathLike | None = None,
    log: Log = lambda message: None,
) -> DecodedSplit:
    """Decode ``items`` = [(file, label), ...] into a :class:`DecodedSplit`."""
    paths = [Path(p) for p, _ in items]
    labels = torch.tensor([label for _, label in items], dtype=torch.int64)
    h, w = spec.size
    shape = (len(paths), spec.channels, h, w)
    nbytes = int(np.prod(shape))
    policy = spec.cache
    if policy == "auto":
        policy = "ram" if nbytes < AUTO_RAM_LIMIT else "disk"
    if policy == "disk" and cache_dir is None:
        log("warning: data.cache is 'disk' but there is no cache folder; decoding to RAM")
        policy = "ram"

    if policy == "disk":
        x, ok, bad = _disk_cached(paths, spec, Path(cache_dir), shape, log)  # type: ignore[arg-type]
    else:
        x = torch.empty(shape, dtype=torch.uint8)
        failures = decode_into(x, paths, spec.channels, spec.size, spec.resize)
        bad_idx = {i for i, _ in failures}
        ok = [i for i in range(len(paths)) if i not in bad_idx]
        bad = [(paths[i], reason) for i, reason in failures]
        if bad:
            x = x[ok]
    for path, reason in bad[:MAX_LOGGED_BAD]:
        log(f"warning: skipped {path}: {reason}")
    if len(bad) > MAX_LOGGED_BAD:
        log(f"warning: skipped {len(bad) - MAX_LOGGED_BAD} more unreadable images")
    return DecodedSplit(x, labels[ok], [paths[i] for i in ok], bad)


def _disk_cached(
    paths: list[Path], spec: DataSpec, cache_dir: Path, shape: tuple[int, ...], log: Log
) -> tuple[torch.Tensor, list[int], list[tuple[Path, str]]]:
    key = cache_key(paths, spec)
    data_file = cache_dir / f"{key}.u8"
    meta_file = cache_dir / f"{key}.json"
    row = int(np.prod(shape[1:]))
    try:
        meta = json.loads(meta_file.read_text())
        if data_file.stat().st_size == len(meta["ok"]) * row:
            bad = [(paths[i], reason) for i, reason in meta["bad"]]
            log(f"mapped {len(meta['ok'])} decoded images from {data_file}")
            return _map(data_file, (len(meta["ok"]), *shape[1:])), meta["ok"], bad
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass  # no cache yet, or an unusable one: decode

    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if shape[0]:
            mm = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
            failures = decode_into(mm, paths, spec.channels, spec.size, spec.resize)
            bad_idx = {i for i, _ in failures}
            ok = [i for i in range(len(paths)) if i not in bad_idx]
            for j, i in enumerate(ok):  # compact in place: drop the failed rows
                if i != j:
                    mm[j] = mm[i]
            mm.flush()
            del mm
            os.truncate(tmp, len(ok) * row)
        else:
            failures, ok = [], []
        os.replace(tmp, data_file)
        meta = {"shape": [len(ok), *shape[1:]], "ok": ok, "bad": failures}
        tmp_meta = meta_file.with_name(f".{meta_file.name}.tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, meta_file)  # written last: marks the cache complete
    finally:
        tmp.unlink(missing_ok=True)
    log(f"cached {len(ok)} decoded images in {data_file}")
    bad = [(paths[i], reason) for i, reason in failures]
    return _map(data_file, (len(ok), *shape[1:])), ok, bad


def _map(data_file: Path, shape: tuple[int, ...]) -> torch.Tensor:
    if shape[0] == 0:
        return torch.empty(shape, dtype=torch.uint8)
    # Copy-on-write mapping: pages load on demand, the file is never written.
    mm = np.memmap(data_file, dtype=np.uint8, mode="c", shape=shape)
    return torch.from_numpy(mm)


def check_bad(bad: Sequence[tuple[Path, str]], total: int, max_fraction: float) -> None:
    """Raise :class:`DataError` when more than ``max_fraction`` of files failed."""
    if not bad or total == 0 or len(bad) / total <= max_fraction:
        return
    shown = "; ".join(f"{p}: {reason}" for p, reason in bad[:3])
    more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise DataError(
        f"{len(bad)} of {total} images could not be read ({len(bad) / total:.1%} > "
        f"data.max_bad_fraction {max_fraction:.1%}): {shown}{more}; "
        "fix or remove them, or raise data.max_bad_fraction"
    )
