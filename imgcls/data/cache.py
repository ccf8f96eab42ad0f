"""Decode once: a split becomes one uint8 tensor (N, C, H, W) at the recipe size,
kept in a persistent cache that the next run, ``imgcls evaluate`` on the same
files and every trial of a search map instead of decoding again.

``cache`` policy (``data.cache``):

- ``auto`` (default): the persistent cache below; a split larger than the
  cache cap (``IMGCLS_CACHE_MAX``), or a cache folder that cannot be written,
  is decoded into RAM instead, with a one-line note.
- ``disk``: the persistent cache, always (an unwritable folder is an error).
- ``ram``: the persistent cache, then the tensor is copied into memory (for a
  cache on a slow or network disk).
- ``none``: decode into RAM every run; nothing is read from or written to the
  cache.

The cache (under :func:`default_cache_dir`, ``$IMGCLS_CACHE/decoded``) holds one
folder per split, named by a hash of what the tensor depends on: every file's
absolute path, size and mtime, the target size, channels, resize policy and
:data:`CACHE_VERSION`. A folder holds ``rows.u8`` (the decoded rows of the
readable files, in split order, memory-mapped on use), ``files.txt`` and
``stats.npy`` (per file: size, mtime_ns, row; -1 for unreadable) and
``meta.json`` (which also holds the per-channel pixel sums, so mean/std of a
cached split cost nothing). It is built under a temporary name and renamed into place
(meta.json written last, inside), so a crash or Ctrl-C leaves no entry that
looks complete, and two processes building the same entry both end with one.

When a split changes (files added, removed or edited), the new entry copies
the rows of unchanged files (same path, size and mtime) from the previous
entries of the same source and geometry, decodes only the rest, and then
replaces the previous entry of that split. Once all of a run's splits are
built (:func:`evict`), entries are evicted least recently used first until the
cache fits ``IMGCLS_CACHE_MAX`` (default :data:`DEFAULT_CACHE_MAX`).

An entry in use is never evicted nor replaced: a process using one holds a
shared lock on ``.locks/<key>`` (filelock's reader/writer lock, SQLite) from
before it is built or mapped until the process lets the split go or ends
(the lock dies with the process, even killed); evicting takes the exclusive
lock without waiting, and an entry whose lock is held stays. So a cap smaller
than one run's data keeps that run's entries, says so once, and the next run
maps them.

Files that fail to decode are skipped, reported through ``log`` and returned
in ``DecodedSplit.bad``; :func:`check_bad` enforces ``max_bad_fraction``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from operator import methodcaller
from pathlib import Path
from typing import Any

import numpy as np
import torch

from imgcls.data.batch_decode import DecodePool, decode_into
from imgcls.data.cache_folder import (  # noqa: F401  (the folder's API, also reached through here)
    META,
    cache_max,
    clear_entries,
    default_cache_dir,
    drop_superseded,
    evict,
    hold_entry,
    human_bytes,
    list_entries,
    list_folder,
    parse_size,
    release,
)
from imgcls.data.decode import channel_sums
from imgcls.data.progress import Progress
from imgcls.errors import DataError
from imgcls.recipe import DataSpec

AUTO_RAM_LIMIT = 2 * 1024**3  # kept for callers; ``auto`` now persists (see above)
CACHE_VERSION = 3  # bump when decode/resize output changes (3: per-file cache entries)
Log = Callable[[str], None]
MAX_LOGGED_BAD = 10


@dataclass
class DecodedSplit:
    x: torch.Tensor  # uint8 (N, C, H, W); may be backed by a memory-mapped file
    y: torch.Tensor  # int64 (N,) class indices, or float32 (N, K) multi-hot (multi-label)
    files: Sequence[str | Path]  # as listed (str from a folder scan: no Path per file)
    bad: list[tuple[Any, str]] = field(default_factory=list)  # (path as listed, why)
    # (2, C) int64: per channel, exact sum and sum of squares of x's pixels,
    # kept in the cache entry so a cached run does not read every pixel for
    # mean/std. None when unknown.
    sums: np.ndarray | None = None
    # the cache file x is memory-mapped from (rows from offset 0), or None when x
    # is in RAM: a split larger than memory is streamed from it (imgcls.data.batches)
    file: Path | None = None
    # the shared lock that keeps ``file``'s cache entry from being evicted or
    # replaced while this process uses it (see the module doc); None in RAM
    hold: object | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.files)


def file_stats(paths: Sequence[str], known: dict[str, tuple[int, int]] | None = None) -> np.ndarray:
    """(N, 2) int64 of (size, mtime_ns); -1 for a file that is not there.
    ``known`` (from the listing) saves a stat per file."""
    known = known or {}
    get = known.get
    rows = [get(p) or _stat(p) for p in paths]
    return np.array(rows, dtype=np.int64).reshape(len(paths), 2)


def _stat(path: str) -> tuple[int, int]:
    try:
        s = os.stat(path)
    except OSError:
        return (-1, -1)
    return (s.st_size, s.st_mtime_ns)


def _absolute(names: list[str]) -> list[str]:
    """abspath, only for the names that need it (a folder scan from an
    absolute root gives absolute names; abspath per file costs ~8 us)."""
    sep = os.sep
    if all(map(methodcaller("startswith", sep), names)):
        return names
    return [n if n[:1] == sep else os.path.abspath(n) for n in names]


def _geometry(spec: DataSpec) -> list:
    return [CACHE_VERSION, list(spec.size), spec.channels, spec.resize]


def cache_key(paths: Sequence[str | os.PathLike], spec: DataSpec, stats: np.ndarray | None = None) -> str:
    """Hash of what the decoded tensor depends on: files (path, size, mtime)
    and target geometry. One hash over two buffers, not one update per file."""
    names = _absolute([os.fspath(p) for p in paths])
    stats = file_stats(names) if stats is None else stats
    h = hashlib.sha256(json.dumps(_geometry(spec)).encode())
    h.update("\0".join(names).encode("utf-8", "surrogateescape"))
    h.update(np.ascontiguousarray(stats, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


def load_split(
    items: Sequence[tuple[Path, int]],
    spec: DataSpec,
    cache_dir: str | os.PathLike | None = None,
    log: Log = lambda message: None,
    *,
    stats: dict[str, tuple[int, int]] | None = None,
    source: str | os.PathLike | None = None,
    split: str = "",
    progress: Progress | None = None,
    pool: DecodePool | None = None,
    notes: set[str] | None = None,
    evicting: bool = True,
) -> DecodedSplit:
    """Decode ``items`` = [(file, label), ...] into a :class:`DecodedSplit`,
    through the persistent cache (``cache_dir``, default :func:`default_cache_dir`)
    unless ``spec.cache`` is ``none``.

    ``stats``: (size, mtime_ns) per path from the listing; ``source`` and
    ``split`` name the entry (shown by ``imgcls cache list``; a new entry
    replaces the previous one of the same source, split and geometry).
    ``pool``: decode workers kept across the splits of one dataset; ``notes``:
    notes already said (a note is said once per set); ``evicting=False``
    leaves eviction to the caller (:func:`evict`, once all splits are built).
    """
    notes = set() if notes is None else notes

    def note(message: str) -> None:
        if message not in notes:
            notes.add(message)
            log(message)

    paths = [p for p, _ in items]
    names = [p if isinstance(p, str) else os.fspath(p) for p in paths]
    # a class index per row, or a multi-hot row (multi-label source): float targets for BCE
    multi_hot = bool(items) and isinstance(items[0][1], tuple)
    labels = torch.tensor([label for _, label in items], dtype=torch.float32 if multi_hot else torch.int64)
    h, w = spec.size
    shape = (len(paths), spec.channels, h, w)
    progress = progress or Progress(log)
    what = f"decoding {split}".rstrip()
    policy = spec.cache
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if policy != "none" and len(paths):
        cap = cache_max()
        if policy == "auto" and int(np.prod(shape)) > cap:
            note(
                f"note: a decoded split would exceed IMGCLS_CACHE_MAX ({human_bytes(cap)}); decoding into RAM"
            )
            policy = "none"
        elif policy == "auto" and not _writable(cache):
            note(f"note: cannot write the cache folder {cache}; decoding into RAM")
            policy = "none"
    file = hold = None  # set when x is mapped from the cache
    if policy == "none" or not len(paths):
        x = torch.zeros(shape, dtype=torch.uint8)  # zero: failed rows add nothing to sums
        sums = np.zeros((2, spec.channels), dtype=np.int64)
        with progress.task(what, total=len(paths)) as task:
            failures = decode_into(
                x, names, spec.channels, spec.size, spec.resize, progress=task, log=log, sums=sums, pool=pool
            )
        ok, bad = _split_failures(paths, failures)
        if bad:
            x = x[ok]
    else:
        x, ok, bad, sums, file, hold = _cached(
            names, paths, spec, cache, shape, log, stats, source, split, progress, what, pool
        )
        if policy == "ram":
            x, file = x.clone(), None
            release(hold)
            hold = None
        if evicting:
            evict(cache, log)
    for path, reason in bad[:MAX_LOGGED_BAD]:
        log(f"warning: skipped {path}: {reason}")
    if len(bad) > MAX_LOGGED_BAD:
        log(f"warning: skipped {len(bad) - MAX_LOGGED_BAD} more unreadable images")
    if len(ok) == len(paths):
        return DecodedSplit(x, labels, paths, bad, sums, file, hold)
    return DecodedSplit(x, labels[ok], [paths[i] for i in ok.tolist()], bad, sums, file, hold)


def _ok_rows(failures, n: int) -> np.ndarray:
    keep = np.ones(n, dtype=bool)
    keep[[int(i) for i, _ in failures]] = False
    return np.flatnonzero(keep)


def _split_failures(paths: list, failures: list[tuple[int, str]]):
    return _ok_rows(failures, len(paths)), [(paths[i], reason) for i, reason in failures]


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def _cached(names, paths, spec, cache: Path, shape, log, known, source, split, progress, what, pool):
    """The persistent-cache path of :func:`load_split`: map, or build then
    map; the entry is held (shared lock) from before either, so no other
    process evicts it between its build and its use."""
    # The listing's stats are keyed by the names it produced (absolute for a
    # folder source, see sources.read_folder), so no per-file rewrite here.
    abs_names = _absolute(names)
    stats = file_stats(abs_names, known)
    key = cache_key(abs_names, spec, stats)
    entry = cache / key
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(
            f"{cache}: cannot create the decoded-image cache folder: {exc.strerror or exc}"
        ) from None
    hold = hold_entry(cache, key)
    try:
        found = _map_or_build(
            entry, paths, abs_names, stats, spec, shape, log, source, split, progress, what, pool
        )
    except BaseException:
        release(hold)
        raise
    return (*found, hold)


def _map_or_build(entry, paths, abs_names, stats, spec, shape, log, source, split, progress, what, pool):
    cache, key = entry.parent, entry.name
    hit = _open_entry(entry, shape)
    if hit is not None:
        x, meta = hit
        ok, bad = _split_failures(paths, meta["bad"])
        log(f"mapped {len(ok)} decoded images from {entry / 'rows.u8'}")
        return x, ok, bad, _meta_sums(meta, spec.channels), entry / "rows.u8"
    source_name = os.path.abspath(source) if source is not None else os.path.commonpath(abs_names)
    meta = _build_entry(
        cache, key, abs_names, stats, spec, shape, source_name, split, log, progress, what, pool
    )
    opened = _open_entry(entry, shape)
    if opened is None:
        raise DataError(f"{entry}: the decoded-image cache entry just written cannot be read back")
    x, meta = opened
    ok, bad = _split_failures(paths, meta["bad"])
    return x, ok, bad, _meta_sums(meta, spec.channels), entry / "rows.u8"


def _meta_sums(meta: dict, channels: int) -> np.ndarray | None:
    try:
        sums = np.array(meta["sums"], dtype=np.int64)
    except (KeyError, TypeError, ValueError, OverflowError):
        return None
    return sums if sums.shape == (2, channels) else None


def _open_entry(entry: Path, shape) -> tuple[torch.Tensor, dict] | None:
    """Map a complete entry's rows (and mark it used), or None."""
    try:
        meta = json.loads((entry / META).read_text())
        rows = entry / "rows.u8"
        n_ok = int(meta["images"])
        row_bytes = int(np.prod(shape[1:]))
        if meta["files"] != shape[0] or rows.stat().st_size != n_ok * row_bytes:
            return None
        os.utime(entry)  # last used, for LRU eviction
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if n_ok == 0:
        return torch.empty((0, *shape[1:]), dtype=torch.uint8), meta
    # Copy-on-write mapping: pages load on demand, the file is never written.
    return torch.from_numpy(np.memmap(rows, dtype=np.uint8, mode="c", shape=(n_ok, *shape[1:]))), meta


def _build_entry(cache, key, names, stats, spec, shape, source, split, log, progress, what, pool) -> dict:
    tmp = cache / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        n = len(names)
        mm = np.memmap(tmp / "rows.u8", dtype=np.uint8, mode="w+", shape=shape)
        todo = np.ones(n, dtype=bool)
        known_bad: dict[int, str] = {}
        reused = _reuse_rows(cache, key, names, stats, spec, source, mm, todo, known_bad)
        need = np.flatnonzero(todo)
        failures: list[tuple[int, str]] = list(known_bad.items())
        sums = np.zeros((2, spec.channels), dtype=np.int64)
        if len(need):
            whole = len(need) == n
            sub = mm if whole else np.zeros((len(need), *shape[1:]), dtype=np.uint8)
            with progress.task(what, total=len(need)) as task:
                fails = decode_into(
                    sub,
                    [names[i] for i in need] if not whole else names,
                    spec.channels,
                    spec.size,
                    spec.resize,
                    progress=task,
                    log=log,
                    # workers write straight into the new file (the rows
                    # file is fresh, so failed rows stay zero)
                    file=(os.fspath(tmp / "rows.u8"), 0) if whole else None,
                    sums=sums,
                    pool=pool,
                )
            if not whole:
                mm[need] = sub
            failures += [(int(need[i]), reason) for i, reason in fails]
        failures.sort()
        ok = _ok_rows(failures, n)
        if reused:  # reused rows are not in the decode's sums: count them all
            sums = channel_sums(mm)
        if len(ok) < n:  # compact in place: drop the failed rows (zero: sums unchanged)
            for j, i in enumerate(ok.tolist()):
                if i != j:
                    mm[j] = mm[i]
        mm.flush()
        del mm
        row_bytes = int(np.prod(shape[1:]))
        os.truncate(tmp / "rows.u8", len(ok) * row_bytes)
        rows = np.full(n, -1, dtype=np.int64)
        rows[ok] = np.arange(len(ok))
        np.save(tmp / "stats.npy", np.column_stack([stats, rows]))
        (tmp / "files.txt").write_text("\n".join(names), encoding="utf-8", errors="surrogateescape")
        meta = {
            "version": CACHE_VERSION,
            "key": key,
            "geometry": _geometry(spec),
            "source": source,
            "split": split,
            "files": n,
            "images": len(ok),
            "bytes": len(ok) * row_bytes,
            "bad": failures,
            "sums": sums.tolist(),
            "created": time.time(),
        }
        (tmp / META).write_text(json.dumps(meta))  # last: marks the folder complete
        try:
            os.rename(tmp, cache / key)
        except OSError:
            pass  # another process built the same entry first: theirs is as good
        else:
            drop_superseded(cache, key, meta)
        decoded = n - reused - len(known_bad)
        log(f"cached {len(ok)} decoded images in {cache / key} ({decoded} decoded, {reused} reused)")
        return meta
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _reuse_rows(cache, key, names, stats, spec, source, mm, todo, known_bad) -> int:
    """Copy into ``mm`` the rows other entries (same geometry and source) hold
    for unchanged files; clear them in ``todo``. Returns how many were reused."""
    geometry = _geometry(spec)
    reused = 0
    for entry, meta in sorted(list_folder(cache), key=lambda em: -em[0].stat().st_mtime):
        if meta.get("geometry") != geometry or meta.get("source") != source or meta.get("key") == key:
            continue
        try:
            old_names = (
                (entry / "files.txt").read_text(encoding="utf-8", errors="surrogateescape").split("\n")
            )
            old_stats = np.load(entry / "stats.npy")
            old_bad = dict((int(i), r) for i, r in meta["bad"])
            where = {n: i for i, n in enumerate(old_names)}
            old_rows = np.memmap(
                entry / "rows.u8", dtype=np.uint8, mode="r", shape=(meta["images"], *mm.shape[1:])
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        new_idx, old_idx = [], []
        for i in np.flatnonzero(todo):
            j = where.get(names[i])
            if (
                j is None
                or old_stats[j, 0] != stats[i, 0]
                or old_stats[j, 1] != stats[i, 1]
                or stats[i, 0] < 0
            ):
                continue
            if old_stats[j, 2] >= 0:
                new_idx.append(i)
                old_idx.append(old_stats[j, 2])
            elif j in old_bad:
                known_bad[int(i)] = old_bad[j]
                todo[i] = False
        if new_idx:
            mm[np.array(new_idx)] = old_rows[np.array(old_idx)]
            todo[new_idx] = False
            reused += len(new_idx)
        if not todo.any():
            break
    return reused


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
