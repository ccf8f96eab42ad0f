"""What ``imgcls pick`` writes: the ranked list, and copies of the picked files for labelling.

- :func:`write_list`: the picks as CSV (``rank,file,score,label,probability``)
  or JSON, by the file's suffix, written atomically.
- :func:`check_copy_target` / :func:`copy_out`: ``--copy-to DIR``. The
  originals are only read (copied, never moved or touched). Each copy is named
  ``<rank>-<its name>`` (``0001-cat.png``), so files of the same name from
  different folders do not clash and the folder lists them in rank order;
  ``picks.csv`` in DIR maps each copy to its original. DIR must not lie inside
  the data (the next pick would find the copies). An existing DIR is used only
  when it is empty, or when it holds nothing but an earlier pick's copies and
  its ``picks.csv`` (then that earlier pick is replaced); anything else in it
  (a labelled sub-folder, a renamed copy) is the user's, and DIR is refused.
  The copies are made in a temporary folder beside DIR and renamed into place,
  so DIR never holds half a pick.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from imgcls import interrupts
from imgcls.errors import UsageError
from imgcls.io import atomic_path
from imgcls.text import json_safe, plain, shown

COLUMNS = ("rank", "file", "score", "label", "probability")
MANIFEST = "picks.csv"
MANIFEST_COLUMNS = ("rank", "copy", *COLUMNS[1:])
LIST_SUFFIXES = (".csv", ".json")
_NAME_MAX = 255  # bytes, on the usual file systems


# --------------------------------------------------------------------------- the list


def check_list_path(path: Path) -> None:
    if path.suffix.lower() not in LIST_SUFFIXES:
        raise UsageError(f"--out {shown(path)}: write a .csv or a .json file")
    if path.is_dir():
        raise UsageError(f"--out {shown(path)}: is a folder; give a file name")


def _row(pick) -> list[str]:
    return [
        str(pick.rank),
        plain(pick.file),
        f"{pick.score:.6f}",
        plain(pick.label),
        f"{pick.probability:.6f}",
    ]


def list_csv(picks: Iterable) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    writer.writerows(_row(p) for p in picks)
    return buf.getvalue()


def write_list(path: Path, picks: Sequence, document: dict) -> None:
    """``picks`` to ``path``: CSV rows, or (``.json``) ``document``; atomically."""
    text = (
        list_csv(picks) if path.suffix.lower() == ".csv" else json.dumps(json_safe(document), indent=1) + "\n"
    )
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- copies


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _ours(dest: Path) -> bool:
    """DIR holds nothing but an earlier pick: its picks.csv and (some of) the copies it lists."""
    manifest = dest / MANIFEST
    try:
        with manifest.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    if not rows or tuple(rows[0]) != MANIFEST_COLUMNS:
        return False
    listed = {row[1] for row in rows[1:] if len(row) > 1}
    for entry in os.scandir(dest):
        if entry.name == MANIFEST:
            continue
        if entry.name not in listed or not entry.is_file(follow_symlinks=False):
            return False
    return True


def check_copy_target(dest: Path, data: Iterable[Path]) -> bool:
    """Refuse ``dest`` inside the data, or an existing non-empty ``dest`` that is not an
    earlier pick's; True when ``dest`` holds an earlier pick (to be replaced)."""
    target = dest.expanduser().resolve()
    for root in {Path(p).expanduser().resolve() for p in data}:
        if _inside(target, root):
            raise UsageError(
                f"--copy-to {shown(dest)}: is inside the data ({shown(root)}); the copies would be "
                "picked again as unlabelled images: choose a folder outside it"
            )
    if not target.exists():
        return False
    if not target.is_dir():
        raise UsageError(f"--copy-to {shown(dest)}: exists and is not a folder")
    if not any(os.scandir(target)):
        return False
    if _ours(target):
        return True
    raise UsageError(
        f"--copy-to {shown(dest)}: is not empty and holds files an earlier imgcls pick did not put there; "
        "give a new or empty folder (nothing was copied)"
    )


def copy_name(rank: int, width: int, original: str) -> str:
    """``0001-name.png``: the rank, then the original name (cut to fit a file name's bytes)."""
    name = os.path.basename(original)
    prefix = f"{rank:0{width}d}-"
    stem, suffix = os.path.splitext(name)
    budget = _NAME_MAX - len(os.fsencode(prefix + suffix))
    raw = os.fsencode(stem)
    if len(raw) > budget:
        stem = os.fsdecode(raw[:budget].decode("utf-8", "ignore").encode("utf-8")) or "image"
    return prefix + stem + suffix


def _copy_regular(src: str, dst: Path) -> None:
    st = os.stat(src)
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{shown(src)}: is no longer a regular file; nothing was copied")
    shutil.copy2(src, dst)  # reads src only; the copy keeps its modification time


def copy_out(picks: Sequence, dest: Path, replace: bool) -> Path:
    """Copy the picked files into ``dest`` (see the module's docstring); returns ``dest``.

    ``replace``: ``dest`` holds an earlier pick (:func:`check_copy_target`), swapped for this one.
    """
    dest = dest.expanduser()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        width = max(4, len(str(len(picks))))
        rows: list[tuple[str, ...]] = [MANIFEST_COLUMNS]
        for p in picks:
            interrupts.check()
            name = copy_name(p.rank, width, p.file)
            _copy_regular(p.file, tmp / name)
            rows.append((str(p.rank), plain(name), *_row(p)[1:]))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(rows)
        (tmp / MANIFEST).write_text(buf.getvalue(), encoding="utf-8")
        old = None
        if replace and dest.exists():
            old = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.old"
            dest.rename(old)
        elif dest.exists():
            dest.rmdir()  # empty (checked): the rename needs it gone
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # the earlier pick's copies only (checked by _ours)
    return dest
