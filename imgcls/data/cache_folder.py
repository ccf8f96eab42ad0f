"""The decoded-image cache folder: where it is, how large it may grow
(``IMGCLS_CACHE_MAX``), its entries, the file lock each entry in use holds,
and eviction. :mod:`imgcls.data.cache` builds and maps the entries.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from imgcls.data.shapes import cache_root
from imgcls.errors import UsageError

DEFAULT_CACHE_MAX = "20G"
STALE_TEMP_S = 3600.0  # a temporary entry older than this is a crashed writer's
META = "meta.json"
Log = Callable[[str], None]


def default_cache_dir() -> Path:
    """``$IMGCLS_CACHE/decoded`` (see :func:`imgcls.data.shapes.cache_root`)."""
    return cache_root() / "decoded"


def parse_size(text: str) -> int:
    """``"20G"``, ``"500M"``, ``"1.5T"``, ``"123"`` (bytes) -> bytes (powers of 1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UsageError(f"IMGCLS_CACHE_MAX={text!r}: expected a size like 20G, 500M or 1.5T")
    return int(float(m[1]) * 1024 ** " KMGT".index((m[2] or " ").upper()))


def cache_max() -> int:
    """The cache's size cap in bytes: ``$IMGCLS_CACHE_MAX``, else 20 GiB."""
    return parse_size(os.environ.get("IMGCLS_CACHE_MAX") or DEFAULT_CACHE_MAX)


def list_folder(cache: Path) -> list[tuple[Path, dict]]:
    out: list[tuple[Path, dict]] = []
    try:
        folders = list(os.scandir(cache))
    except OSError:
        return out
    for e in folders:
        if e.name.startswith(".") or not e.is_dir():
            continue
        try:
            out.append((Path(e.path), json.loads(Path(e.path, META).read_text())))
        except (OSError, ValueError):
            continue
    return out


def drop_superseded(cache: Path, key: str, meta: dict) -> None:
    """The entry of the same source, split and geometry that this one replaces."""
    for entry, other in list_folder(cache):
        same = all(other.get(k) == meta[k] for k in ("source", "split", "geometry"))
        if same and other.get("key") != key:
            _remove_unused(cache, entry.name)  # one in use stays: eviction removes it later


def _drop_replaced(cache: Path) -> None:
    """Entries that a newer one of the same source, split and geometry
    replaced while a process still used them (see :func:`drop_superseded`)."""
    newest: dict[str, tuple[float, str]] = {}
    entries = list_folder(cache)
    for entry, meta in entries:
        which = json.dumps([meta.get(k) for k in ("source", "split", "geometry")])
        created = float(meta.get("created") or 0)
        if which not in newest or created > newest[which][0]:
            newest[which] = (created, entry.name)
    for entry, meta in entries:
        which = json.dumps([meta.get(k) for k in ("source", "split", "geometry")])
        if newest[which][1] != entry.name:
            _remove_unused(cache, entry.name)


def _lock_path(cache: Path, key: str) -> Path:
    locks = cache / ".locks"
    locks.mkdir(exist_ok=True)
    return locks / key


def hold_entry(cache: Path, key: str):
    """A shared lock on entry ``key`` (which need not exist yet), or None where
    the lock cannot be made (a read-only cache folder: nothing evicts there)."""
    from filelock import ReadWriteLock

    try:
        lock = ReadWriteLock(_lock_path(cache, key), is_singleton=False)
        lock.acquire_read()  # waits only while another process removes the entry
    except (OSError, sqlite3.Error, ValueError):
        return None
    return lock


def release(lock) -> None:
    if lock is not None:
        lock.close()


def _remove_unused(cache: Path, key: str) -> bool:
    """Remove entry ``key`` unless a process holds it; whether it was removed."""
    from filelock import ReadWriteLock, Timeout

    try:
        lock = ReadWriteLock(_lock_path(cache, key), is_singleton=False)
        lock.acquire_write(blocking=False)
    except (Timeout, OSError, sqlite3.Error, ValueError):
        return False
    try:
        shutil.rmtree(cache / key, ignore_errors=True)
    finally:
        lock.close()
    return True


def evict(cache: str | os.PathLike | None, log: Log) -> None:
    """Least recently used entries first, until the cache fits its cap; an
    entry a process holds (this one's splits included) is never removed. Call
    it once a run's splits are all built."""
    cache = Path(cache) if cache is not None else default_cache_dir()
    if not cache.is_dir():
        return
    _drop_replaced(cache)
    cap = cache_max()
    entries = list_entries(cache)
    total = sum(e["bytes"] for e in entries)
    for e in sorted(entries, key=lambda e: e["last_used"]):
        if total <= cap:
            break
        if not _remove_unused(cache, e["key"]):
            continue
        total -= e["bytes"]
        log(
            f"cache: evicted {e['key']} ({e['source']} {e['split']}, {human_bytes(e['bytes'])}) to stay under IMGCLS_CACHE_MAX"
        )
    if total > cap:
        log(
            f"warning: the decoded cache ({human_bytes(total)}, entries in use kept) exceeds "
            f"IMGCLS_CACHE_MAX ({human_bytes(cap)}); raise it to keep this data decoded between runs"
        )
    _remove_stale_temps(cache)


def _remove_stale_temps(cache: Path) -> None:
    now = time.time()
    for p in cache.glob(".tmp-*"):
        try:
            if now - p.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def list_entries(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Every complete cache entry: key, source, split, images, bytes (on disk),
    last_used (epoch seconds), most recently used first."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = []
    for entry, meta in list_folder(cache):
        try:
            size = sum(f.stat().st_size for f in entry.iterdir())
            used = entry.stat().st_mtime
        except OSError:
            continue
        out.append(
            {
                "key": entry.name,
                "source": meta.get("source", ""),
                "split": meta.get("split", ""),
                "images": meta.get("images", 0),
                "bytes": size,
                "last_used": used,
            }
        )
    return sorted(out, key=lambda e: -e["last_used"])


def clear_entries(
    keys: Sequence[str] = (), cache_dir: str | os.PathLike | None = None
) -> tuple[int, int, int]:
    """Remove the named entries (a unique key prefix is enough), or all when
    ``keys`` is empty; returns (entries removed, bytes freed, entries kept
    because a running process uses them). An unknown key is a
    :class:`UsageError` and nothing is removed."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entries = list_entries(cache)
    if keys:
        chosen = []
        for k in keys:
            match = [e for e in entries if e["key"].startswith(k)]
            if len(match) != 1:
                why = "no cache entry" if not match else f"{len(match)} cache entries"
                raise UsageError(f"{k}: {why} with that key (see `imgcls cache list`)")
            chosen.append(match[0])
    else:
        chosen = entries
    freed = kept = 0
    for e in chosen:
        if _remove_unused(cache, e["key"]):
            freed += e["bytes"]
        else:
            kept += 1
    if not keys:
        for p in cache.glob(".tmp-*"):  # a crashed writer's leftovers
            shutil.rmtree(p, ignore_errors=True)
    return len(chosen) - kept, freed, kept


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB' (for logs and `imgcls cache list`)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
