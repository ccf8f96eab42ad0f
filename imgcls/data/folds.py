"""K-fold assignment for cross-validation (``data.cv``, ``imgcls cv``).

One algorithm for every case: iterative stratification (Sechidis, Tsoumakas
and Vlahavas, "On the stratification of multi-label data", ECML PKDD 2011),
applied to *units*: an image, or with grouping a whole group of images, each
with its vector of label counts. Each fold wants 1/K of every label's count
and 1/K of the images. The label with the fewest units left is taken next;
each of its units (largest first) goes to the fold that still wants most of
that label (ties: the fold that wants most images, then a seeded draw), and
the fold's wants shrink by the unit's counts. Units with no label at all
(multi-label rows that are negative for every class) go where most images are
still wanted.

- Single-label, ungrouped: every class is dealt round the folds, so each
  fold holds floor or ceil of n_c / K images of class c (exact stratification).
- Multi-label: Sechidis et al.'s algorithm itself, label by label.
- Grouped (a patient, an object, near-copies): a group is one unit and lands
  in one fold whole; the folds are as stratified as whole groups allow
  (a stratified group k-fold).

Deterministic: the units are sorted (by path, by group name) before the
seeded draws, so the same files, K and seed give the same folds wherever
and in whatever order they were listed.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.errors import DataError
from imgcls.recipe import CVSpec

_TIE = 1e-9


def assign_folds(counts: np.ndarray, sizes: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each unit; ``counts`` is units x labels, ``sizes`` images per unit."""
    n = len(counts)
    rng = np.random.default_rng([seed, k, zlib.crc32(b"imgcls cv")])
    want = np.tile(counts.sum(0) / k, (k, 1)).astype(float)  # k x labels, still wanted
    room = np.full(k, sizes.sum() / k, dtype=float)  # images still wanted per fold
    fold = np.full(n, -1, dtype=np.int64)
    left = np.ones(n, dtype=bool)
    while True:
        remaining = (counts[left] > 0).sum(0)  # units left per label
        labels = np.flatnonzero(remaining)
        if not labels.size:
            break
        rarest = labels[remaining[labels] == remaining[labels].min()]
        label = int(rarest[rng.integers(len(rarest))])
        units = np.flatnonzero(left & (counts[:, label] > 0))
        units = units[rng.permutation(len(units))]
        units = units[np.argsort(-sizes[units], kind="stable")]  # big groups first, while there is room
        for u in units:
            j = _pick(want[:, label], room, rng)
            fold[u] = j
            want[j] -= counts[u]
            room[j] -= sizes[u]
        left[units] = False
    rest = np.flatnonzero(left)  # no label at all
    for u in rest[rng.permutation(len(rest))]:
        j = _pick(room, room, rng)
        fold[u] = j
        room[j] -= sizes[u]
    return fold


def _pick(first: np.ndarray, second: np.ndarray, rng: np.random.Generator) -> int:
    """The index with the largest ``first``; ties by ``second``, then drawn."""
    cand = np.flatnonzero(first >= first.max() - _TIE)
    if len(cand) > 1:
        cand = cand[second[cand] >= second[cand].max() - _TIE]
    return int(cand[rng.integers(len(cand))]) if len(cand) > 1 else int(cand[0])


def fold_of_items(
    labels: Sequence,
    classes: list[str],
    groups: Sequence[str] | None,
    k: int,
    seed: int,
    *,
    where: str,
    log: Callable[[str], None] = lambda message: None,
) -> np.ndarray:
    """The fold (0..k-1) of each item: ``labels`` are class indices or
    multi-hot tuples; ``groups`` (one name per item, or None) keep items together.

    Refused (:class:`DataError`, naming ``where``): a single-label class with
    fewer images than folds, or fewer units (groups) than folds. Warned: a
    class or label found in fewer groups or rows than folds (some folds
    validate without it)."""
    multilabel = bool(labels) and isinstance(labels[0], tuple)
    hot = np.asarray(labels, dtype=np.int64) if multilabel else np.eye(len(classes), dtype=np.int64)[labels]
    per_class = hot.sum(0)
    if not multilabel:
        small = [(classes[c], int(per_class[c])) for c in range(len(classes)) if 0 < per_class[c] < k]
        if small:
            name, n = small[0]
            raise DataError(
                f"{where}: class '{name}' has {n} training image{'s' if n != 1 else ''}, fewer than the {k} "
                "folds (each fold validates on every class); use fewer --folds"
            )
    if groups is None:
        unit_of = np.arange(len(hot))
        counts = hot
    else:
        names, unit_of = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        counts = np.zeros((len(names), hot.shape[1]), dtype=np.int64)
        np.add.at(counts, unit_of, hot)
    sizes = np.bincount(unit_of, minlength=len(counts))
    if len(counts) < k:
        what = "groups" if groups is not None else "images"
        raise DataError(f"{where}: only {len(counts)} {what} to deal into {k} folds; use fewer --folds")
    spread = (counts > 0).sum(0)
    thin = [classes[c] for c in range(len(classes)) if 0 < spread[c] < k]
    if thin:
        unit = "groups" if groups is not None else "images"
        shown = ", ".join(f"'{c}'" for c in thin[:5]) + (" ..." if len(thin) > 5 else "")
        log(
            f"warning: {len(thin)} class{'es' if len(thin) != 1 else ''} ({shown}) found in fewer {unit} "
            f"than the {k} folds: some folds validate without {'them' if len(thin) != 1 else 'it'}"
        )
    return assign_folds(counts, sizes, k, seed)[unit_of]


def folder_group(path: str | os.PathLike, root: Path, depth: int, split_dirs: bool) -> str:
    """The group of a file in a class-folder tree: its sub-folders under the
    class folder, down to ``depth`` levels (``root/cat/alice/1.png`` at depth 1:
    ``alice``). The class is not part of the name, so ``cat/alice`` and
    ``dog/alice`` are one group (a patient with images of two classes stays in
    one fold). A file right in its class folder is a group of its own.
    ``split_dirs``: the tree has ``train/`` (and ``val/``) above the class folders."""
    parts = Path(os.path.relpath(path, root)).parts
    if split_dirs and len(parts) > 2:
        parts = parts[1:]
    sub = parts[1:-1][:depth]
    return "/".join(sub) if sub else "\0" + "/".join(parts)  # \0: no folder name can collide with a file's


def cv_split(source: Any, cv: CVSpec, seed: int, log: Callable[[str], None] = lambda message: None) -> Any:
    """``data.cv`` on a listed :class:`~imgcls.data.sources.Source`: train and
    val pooled (sorted by path) and dealt into K folds; fold ``cv.fold``
    validates, the others train (``fold: all``: everything trains, nothing
    validates). The test split is left as it is."""
    pool = sorted(source.train + source.val, key=lambda item: os.fspath(item[0]).replace(os.sep, "\0"))
    source = replace(source, train=pool, val=[])
    if cv.fold == "all":
        return source
    fold = fold_array(source, cv, seed, log).tolist()
    val = [item for item, f in zip(pool, fold, strict=True) if f == cv.fold - 1]
    train = [item for item, f in zip(pool, fold, strict=True) if f != cv.fold - 1]
    log(f"data.cv: fold {cv.fold} of {cv.folds} validates ({len(val)} images), the other folds train ({len(train)})")
    return replace(source, train=train, val=val)


def fold_array(
    source: Any, cv: CVSpec, seed: int, log: Callable[[str], None] = lambda message: None
) -> np.ndarray:
    """The fold (0..K-1) of each of ``source.train`` (the pool, as :func:`cv_split` sorts it)."""
    pool = source.train
    groups: list[str] | None = None
    if cv.group_by is not None:  # an empty cell: a group of its own
        groups = [source.groups.get(os.fspath(p)) or "\0" + os.fspath(p) for p, _ in pool]
    elif cv.group_by_folder is not None:
        split_dirs = (source.root / "train").is_dir()
        groups = [folder_group(p, source.root, cv.group_by_folder, split_dirs) for p, _ in pool]
    labels = [y for _, y in pool]
    return fold_of_items(labels, source.classes, groups, cv.folds, seed, where=f"{source.root}", log=log)


def csv_groups(csv_path: Path, rows: Sequence[Any], column: str) -> dict[str, str]:
    """file -> its cell in ``column`` (data.cv.group_by) of a CSV's
    :class:`~imgcls.data.sources.LabelledRow` s; an unknown column names the known ones."""
    known = list(rows[0].extra)
    if column not in known:
        has = f"its other columns: {', '.join(known)}" if known else "no header row names more columns"
        raise DataError(f"{csv_path}: no column '{column}' to group by (data.cv.group_by; {has})")
    return {os.fspath(r.path): r.extra[column] for r in rows}
