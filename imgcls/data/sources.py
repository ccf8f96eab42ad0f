"""Where the images are: a list of (file, class index) per split.

Three sources, one result (:class:`Source`):

- ``folder``: an ImageFolder tree, one sub-folder per class. Either flat
  (``root/<class>/...``, split into train/val automatically) or with
  ``train/`` and ``val/`` (and optionally ``test/``) sub-trees, whose class
  folders must agree. With ``train/`` but no ``val/``, train is split.
- ``csv``: rows of ``file,label`` or ``file,label,split`` (split: train, val,
  test, or empty), paths relative to the CSV file, header row optional.
  Without any ``val`` rows, the train rows are split automatically.
  Multi-label: the label cell may hold several labels separated by ``;`` or
  ``|`` (``dog;cat``; quote nothing, a comma would start a new column). When
  any training row has more than one label (or ``data.task: multilabel``),
  the source's task is ``multilabel`` and each item's label is a multi-hot
  tuple (one 0/1 per class) instead of a class index. In multi-label data a
  row may leave the label cell empty: an image with no positive label (a
  negative for every class). An empty file name is always an error. A
  header row naming 4 columns or more (``file,label,patient,split``): the
  one named ``split`` is the split, the others are kept per row
  (``data.cv.group_by`` names one; so may the third of 3 columns).
- ``shapes``: the built-in synthetic set, written once, then read as a folder.

The automatic split is stratified and seeded (``val_split``, ``split_seed``):
each class is shuffled with its own generator seeded by (split_seed, class
name), so adding a class leaves the other classes' splits unchanged; every
class with at least 2 images gets at least 1 validation image.

Ignored: hidden files and folders (name starting with ".") and files whose
extension is not an image extension. A class folder with no images is an
error, not a warning: a class with no examples cannot be learned, and
silently dropping it would change the class indices a model is trained on.
The dataset folder is only read, never written. Each real file is listed
once, under the class (and split) of its real path: a symbolic link leading
back into the data set is not followed (``imgcls data check`` names it); one
leading outside is.
"""

from __future__ import annotations

import csv
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from operator import attrgetter, methodcaller
from pathlib import Path
from typing import Any

import numpy as np

from imgcls.data.decode import IMAGE_EXTENSIONS
from imgcls.data.folds import csv_groups, cv_split
from imgcls.data.progress import Task
from imgcls.data.shapes import cache_root, shapes_dir, spec_key, write_shapes
from imgcls.errors import DataError
from imgcls.recipe import DataSpec

# (file, class index), or (file, multi-hot tuple) for a multi-label source.
# A folder scan gives ``str`` paths (a Path per file costs ~18 us: 18 s for a
# million files); a CSV gives Paths.
Items = list[tuple[Any, Any]]  # (path, class index; or a multi-hot tuple for multi-label data)
LABEL_SEPARATORS = re.compile(r"[;|]")
SPLITS = ("train", "val", "test")
_VAL_NAMES = ("val", "valid", "validation")


@dataclass
class Source:
    classes: list[str]
    train: Items
    val: Items
    test: Items = field(default_factory=list)
    root: Path = Path(".")
    # (size, mtime_ns) per listed file, from the listing itself: the decoded
    # cache's key, without a second stat per file. May miss files (CSV).
    stats: dict[str, tuple[int, int]] = field(default_factory=dict)
    task: str = "single"  # or "multilabel": labels are multi-hot tuples
    groups: dict[str, str] = field(default_factory=dict)  # file -> its data.cv.group_by cell (CSV)

    def __len__(self) -> int:
        return len(self.train) + len(self.val) + len(self.test)


def open_source(
    spec: DataSpec, base_dir: str | os.PathLike = ".", progress: Task | None = None, log=lambda message: None
) -> Source:
    """List the images of ``spec`` (relative paths are relative to ``base_dir``);
    ``progress`` counts the files found; ``log`` takes warnings. With
    ``spec.cv``, train and val are one fold of a K-fold split (:func:`cv_split`)."""
    base_dir = Path(base_dir)
    group_by = spec.cv.group_by if spec.cv is not None else None
    if spec.source == "shapes":
        if spec.path:
            out = write_shapes(resolve(spec.path, base_dir), spec.shapes)
        else:
            out = _builtin_shapes(spec.shapes, log)
        source = read_folder(out, spec.val_split, spec.split_seed, progress)
    elif spec.source == "folder":
        assert spec.path is not None  # DataSpec checks this
        source = read_folder(resolve(spec.path, base_dir), spec.val_split, spec.split_seed, progress)
    elif spec.source == "csv":
        assert spec.path is not None
        source = read_csv(resolve(spec.path, base_dir), spec.val_split, spec.split_seed, spec.task, group_by)
    else:
        raise DataError(f"unknown data source '{spec.source}'")
    return cv_split(source, spec.cv, spec.split_seed, log) if spec.cv is not None else source


def _builtin_shapes(spec, log) -> Path:
    """The built-in set at :func:`shapes_dir`; where the cache folder cannot be
    written (``IMGCLS_CACHE`` a file or a read-only folder), under the system's
    temporary folder instead, said in one warning line (as folder data then
    decodes into RAM)."""
    try:
        return write_shapes(shapes_dir(spec), spec)
    except OSError as exc:
        uid = os.getuid() if hasattr(os, "getuid") else "user"
        fallback = Path(tempfile.gettempdir()) / f"imgcls-{uid}" / "shapes" / spec_key(spec)
        log(
            f"warning: cannot write the cache folder {cache_root()} ({exc.strerror or exc}); "
            f"the built-in shapes data goes to {fallback.parent}"
        )
        try:
            return write_shapes(fallback, spec)
        except OSError as again:
            raise DataError(
                f"cannot write the built-in shapes data to {cache_root()} nor {fallback.parent} "
                f"({again.strerror or again}); set IMGCLS_CACHE to a writable folder"
            ) from None


def resolve(path: str | os.PathLike, base_dir: Path) -> Path:
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    return p if p.is_absolute() else base_dir / p


# --------------------------------------------------------------------------- folder


def read_folder(root: Path, val_split: float, split_seed: int, progress: Task | None = None) -> Source:
    stats: Stats = {}
    # Absolute once here, so every listed name is absolute and the cache key
    # needs no abspath per file.
    root = Path(os.path.abspath(root))
    if not root.exists():
        raise DataError(f"{root}: no such folder (check data.path)")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (data.source 'folder' wants a folder)")
    # each real file once, under the class (and split) of its real path
    walk: dict[str, Any] = dict(within=os.path.realpath(root), seen=set())
    train_dir = root / "train"
    if train_dir.is_dir():
        classes, train = scan_class_folders(train_dir, stats, progress, **walk)
        val_dir = next((root / n for n in _VAL_NAMES if (root / n).is_dir()), None)
        if val_dir is not None:
            val = _scan_split(val_dir, classes, stats, **walk)
        else:
            train, val = stratified_split(train, classes, val_split, split_seed)
        test = _scan_split(root / "test", classes, stats, **walk) if (root / "test").is_dir() else []
        return Source(classes, train, val, test, root, stats)
    classes, items = scan_class_folders(root, stats, progress, **walk)
    train, val = stratified_split(items, classes, val_split, split_seed)
    return Source(classes, train, val, [], root, stats)


def _visible_dirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(f"{folder}: cannot list: {exc.strerror or exc}") from None
    return [p for p in entries if not p.name.startswith(".") and p.is_dir()]


Stats = dict[str, tuple[int, int]]  # path -> (size, mtime_ns), gathered while listing
Links = list[tuple[str, str]]  # (symbolic link, its real target) leading back into a data set


def _inside(real: str, root: str) -> bool:
    """Is the real path ``real`` the real path ``root`` or below it?"""
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively), hidden entries skipped, sorted."""
    return [Path(p) for p in walk_images(folder)]


def walk_images(
    folder: str | os.PathLike,
    stats: Stats | None = None,
    progress: Task | None = None,
    *,
    within: str | None = None,
    seen: set[str] | None = None,
    links: Links | None = None,
) -> list[str]:
    """:func:`images_under` as plain strings, by ``os.scandir``: no per-file
    ``Path``, and each file's (size, mtime_ns) stored in ``stats`` on the way
    (the decoded cache keys on them, so they are not asked for twice).

    Order: a folder's files (sorted by name), then its sub-folders (sorted),
    depth first; a symlink loop is walked once.

    ``within`` (the real path of the data set) makes each real file count once,
    in its own place: a symbolic link whose target lies inside the data set is
    not followed (the target is listed where it really is, under its own
    class) and goes to ``links`` as (link, target); a link leading outside is
    followed. ``seen`` (real paths already walked) is shared by the walks of
    one data set, so a place two links lead to is listed once.
    """
    found: list[str] = []
    seen = set() if seen is None else seen
    exts = tuple(IMAGE_EXTENSIONS)
    start = os.fspath(folder)
    # (folder, reached through a link): only there is a real path worked out per entry
    todo = [(start, within is not None and os.path.islink(start))]
    if within is not None and todo[0][1] and _inside(os.path.realpath(start), within):
        if links is not None:
            links.append((start, os.path.realpath(start)))
        return found
    while todo:
        top, linked = todo.pop()
        real = os.path.realpath(top)
        if real in seen:
            continue
        seen.add(real)
        try:
            with os.scandir(top) as it:
                entries = sorted(it, key=_BY_NAME)
        except OSError:
            continue  # unreadable sub-folder: os.walk skipped it too
        subdirs = []
        for e in entries:
            name = e.name
            if name.startswith("."):
                continue
            try:
                is_dir = e.is_dir()
            except OSError:
                is_dir = False
            if not is_dir and not name.lower().endswith(exts):  # = splitext(name)[1] in exts
                continue
            via_link = False
            if within is not None and (linked or e.is_symlink()):
                target = os.path.realpath(e.path) if e.is_symlink() else os.path.join(real, name)
                if _inside(target, within):  # back into the data set: counted where it really is
                    if links is not None:
                        links.append((e.path, target))
                    continue
                if not is_dir:
                    if target in seen:  # a file two links lead to
                        continue
                    seen.add(target)
                via_link = True
            if is_dir:
                subdirs.append((e.path, via_link))
                continue
            found.append(e.path)
            if stats is not None:
                try:
                    st = e.stat()
                    stats[e.path] = (st.st_size, st.st_mtime_ns)
                except OSError:
                    pass  # a broken link: listed, and the decoder says why
        todo.extend(reversed(subdirs))
        if progress is not None:
            progress.advance(len(found) - progress.done)
    return found


def scan_class_folders(
    folder: Path,
    stats: Stats | None = None,
    progress: Task | None = None,
    *,
    for_training: bool = True,
    within: str | None = None,
    seen: set[str] | None = None,
) -> tuple[list[str], Items]:
    """``folder/<class>/...``: the class names (sorted) and every (image, class index).

    ``stats``, when given, receives each file's (size, mtime_ns). Training needs
    at least 2 classes, each with images; ``for_training=False`` (evaluation on
    a subset of a model's classes) accepts one class and skips empty folders.
    Each real file is listed once, under the class of its real path: links back
    into the data set (``within``, by default ``folder``) are not followed
    (:func:`walk_images`)."""
    within = within or os.path.realpath(folder)
    seen = set() if seen is None else seen
    class_dirs = _visible_dirs(folder)
    if not class_dirs:
        raise DataError(f"{folder}: no class folders found (expected one sub-folder of images per class)")
    if len(class_dirs) < 2 and for_training:
        raise DataError(
            f"{folder}: need at least 2 classes (one sub-folder each), found only '{class_dirs[0].name}'"
        )
    classes = [d.name for d in class_dirs]
    items: Items = []
    found = progress.done if progress is not None else 0
    for index, d in enumerate(class_dirs):
        files = walk_images(d, stats, within=within, seen=seen)
        found += len(files)
        if progress is not None:
            progress.advance(found - progress.done)
        if not files and for_training:
            raise DataError(
                f"{d}: class folder has no images (a class with no examples cannot "
                "be learned); add images or remove the folder"
            )
        items.extend(zip(files, [index] * len(files), strict=True))
    return classes, items


def _scan_split(
    folder: Path, classes: list[str], stats: Stats | None = None, *, within: str, seen: set[str]
) -> Items:
    """A val/ or test/ tree: its class folders must match train/'s."""
    names = [d.name for d in _visible_dirs(folder)]
    if names != classes:
        missing = sorted(set(classes) - set(names))
        extra = sorted(set(names) - set(classes))
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"not in train/: {', '.join(extra)}")
        raise DataError(
            f"{folder}: class folders differ from train/ ({'; '.join(parts)}); "
            "every split needs the same class folders"
        )
    items: Items = []
    for index, name in enumerate(classes):
        files = walk_images(folder / name, stats, within=within, seen=seen)
        items.extend(zip(files, [index] * len(files), strict=True))
    return items


# --------------------------------------------------------------------------- split


def stratified_split(items: Items, classes: list[str], val_split: float, seed: int) -> tuple[Items, Items]:
    """Split per class: ``round(n * val_split)`` to val, at least 1 when n >= 2."""
    if val_split <= 0:
        return list(items), []
    by_class: dict[int, list] = {}
    for path, label in items:
        by_class.setdefault(label, []).append(path)
    train: Items = []
    val: Items = []
    for label in sorted(by_class):
        # Sorted as Paths sort (by components: "a/b" before "a-b"), without a
        # Path per file, so a split is the same whatever type the paths are.
        files = by_class[label]
        files = sorted(files, key=_STR_KEY if set(map(type, files)) == {str} else _path_key)
        n = len(files)
        n_val = min(max(round(n * val_split), 1), n - 1) if n >= 2 else 0
        rng = np.random.default_rng([seed, zlib.crc32(classes[label].encode())])
        order = rng.permutation(n)
        in_val = np.zeros(n, dtype=bool)
        in_val[order[:n_val]] = True
        val_i = np.flatnonzero(in_val).tolist()
        train_i = np.flatnonzero(~in_val).tolist()
        val.extend(zip([files[i] for i in val_i], [label] * len(val_i), strict=True))
        train.extend(zip([files[i] for i in train_i], [label] * len(train_i), strict=True))
    return train, val


def _path_key(path: str | Path) -> str:
    # The separator as the smallest character: plain string order is then
    # the order of the components ("a/x" < "a.b/y", as for Paths).
    return os.fspath(path).replace(os.sep, "\0")


_STR_KEY = methodcaller("replace", os.sep, "\0")
_BY_NAME = attrgetter("name")


# --------------------------------------------------------------------------- csv


_HEADER_FILE = {"file", "filename", "path", "image", "img"}


@dataclass
class LabelledRow:
    line: int  # in the CSV file, for error messages
    path: Path
    label: str
    split: str  # "train", "val", "test", or "" when the row has none
    extra: dict[str, str] = field(default_factory=dict)  # the cells of other columns a header row names

    @property
    def labels(self) -> tuple[str, ...]:
        """The row's labels: ``dog;cat`` or ``dog|cat`` is two (order kept, repeats dropped);
        an empty cell is none (multi-label data: a negative for every class)."""
        if not self.label:
            return ()
        return tuple(dict.fromkeys(part.strip() for part in LABEL_SEPARATORS.split(self.label)))


def read_labelled_rows(csv_path: Path, must_exist: bool = True, keep: str | None = None) -> list[LabelledRow]:
    """Every ``file,label[,split]`` row of a CSV; an error names the CSV line.

    Blank lines and lines starting with ``#`` are skipped, and so is a first
    row naming its columns (``file,label``, ``path,class``, ...). Paths are
    relative to the CSV file. ``split`` is validated (val, valid and
    validation all mean ``val``). With ``must_exist``, a listed file that is
    not there is an error; without, the decoder reports it later. A header
    naming 4 columns or more (or 3, the third being ``keep``, a
    ``data.cv.group_by`` column) names them all: the one named ``split`` is
    the split, the others go to each row's ``extra``.
    """
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV file")
    base = csv_path.parent
    rows: list[LabelledRow] = []
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            first = True
            columns: list[str] = []  # a header's names after file and label
            for row in reader:
                line = reader.line_num
                cells = [c.strip() for c in row]
                if not any(cells) or cells[0].startswith("#"):
                    continue
                if first:
                    first = False
                    if _is_header(cells):
                        # file,label,X: X is the split, as it always was, unless X is the column to keep
                        columns = (
                            cells[2:] if len(cells) > 3 or (len(cells) == 3 and cells[2] == keep) else []
                        )
                        continue
                rows.append(_labelled_row(cells, columns, f"{csv_path}:{line}", line, base, must_exist))
    except UnicodeDecodeError as exc:
        raise DataError(f"{csv_path}: not UTF-8 text ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{csv_path}: cannot parse CSV: {exc}") from None
    if not rows:
        raise DataError(f"{csv_path}: no rows (expected 'file,label' or 'file,label,split' lines)")
    return rows


def _labelled_row(
    cells: list[str], columns: list[str], where: str, line: int, base: Path, must_exist: bool
) -> LabelledRow:
    """One data row. Without a header naming more than two columns: ``file,label[,split]``.
    With one (``file,label,patient,split``): a row has up to as many cells as the
    header names, the column named ``split`` is the split, the others are ``extra``."""
    if columns:
        if not 2 <= len(cells) <= 2 + len(columns):
            raise DataError(
                f"{where}: expected the {2 + len(columns)} columns the header row names, got {len(cells)}"
            )
        named = dict(zip(columns, [*cells[2:], *[""] * (2 + len(columns) - len(cells))], strict=True))
        split_column = next((c for c in columns if c.lower() == "split"), None)
        split_cell = named.pop(split_column) if split_column is not None else ""
    else:
        if len(cells) not in (2, 3):
            raise DataError(f"{where}: expected 'file,label' or 'file,label,split', got {len(cells)} columns")
        named, split_cell = {}, cells[2] if len(cells) == 3 else ""
    name, label = cells[0], cells[1]
    split = split_cell.lower()
    if not name:
        raise DataError(f"{where}: empty file name")
    if label and any(not part.strip() for part in LABEL_SEPARATORS.split(label)):
        raise DataError(f"{where}: empty label in '{label}' (several labels are separated by ';' or '|')")
    if split in _VAL_NAMES:
        split = "val"
    if split not in ("", *SPLITS):
        raise DataError(f"{where}: split '{split_cell}' is not train, val or test")
    if Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
        raise DataError(f"{where}: '{name}' does not have an image file extension")
    path = resolve(name, base)
    if must_exist and not path.is_file():
        raise DataError(f"{where}: no such file '{name}' (relative to {base})")
    return LabelledRow(line, path, label, split, named)


def read_csv(
    csv_path: Path, val_split: float, split_seed: int, task: str = "auto", group_by: str | None = None
) -> Source:
    """A CSV source: rows without a split are training rows; classes come from them.

    ``task``: ``auto`` is multi-label when any row holds several labels,
    ``single`` refuses such rows, ``multilabel`` makes every row multi-hot.
    ``group_by``: a column the header row names; its cells go to ``Source.groups``.
    """
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV file (check data.path)")
    rows = read_labelled_rows(csv_path, keep=group_by)
    groups = csv_groups(csv_path, rows, group_by) if group_by is not None else {}
    several = next((r for r in rows if len(r.labels) > 1), None)
    if task == "single" and several is not None:
        raise DataError(
            f"{csv_path}:{several.line}: '{several.label}' holds several labels but data.task is "
            "single; set data.task: multilabel (or auto)"
        )
    multilabel = task == "multilabel" or several is not None
    unlabelled = next((r for r in rows if not r.labels), None)
    if unlabelled is not None and not multilabel:
        hint = (
            "data.task is single"
            if task == "single"
            else "no row holds several labels, so it is single-label"
        )
        raise DataError(
            f"{csv_path}:{unlabelled.line}: empty label; an image without labels (a negative for every "
            f"class) belongs in multi-label data, but {hint}; set data.task: multilabel, or label the row"
        )
    train_labels = sorted({name for r in rows if r.split in ("", "train") for name in r.labels})
    if len(train_labels) < 2:
        raise DataError(f"{csv_path}: need at least 2 classes with training rows, found {len(train_labels)}")
    index = {label: i for i, label in enumerate(train_labels)}
    out: dict[str, Items] = {s: [] for s in SPLITS}
    for r in rows:
        for name in r.labels:
            if name not in index:
                raise DataError(
                    f"{csv_path}:{r.line}: label '{name}' has no training rows "
                    "(a class must appear in train to be learned)"
                )
        if multilabel:
            hot = [0] * len(train_labels)
            for name in r.labels:
                hot[index[name]] = 1
            out[r.split or "train"].append((r.path, tuple(hot)))
        else:
            out[r.split or "train"].append((r.path, index[r.label]))
    train, val = out["train"], out["val"]
    if not val:
        split = multilabel_split if multilabel else stratified_split
        train, val = split(train, train_labels, val_split, split_seed)
    task_name = "multilabel" if multilabel else "single"
    return Source(train_labels, train, val, out["test"], csv_path, task=task_name, groups=groups)


def multilabel_split(items: Items, classes: list[str], val_split: float, seed: int) -> tuple[Items, Items]:
    """Split multi-hot rows as :func:`stratified_split` splits classes, with
    each combination of labels as a stratum (combinations seen once pooled
    into one): ``round(n * val_split)`` of a stratum to val, at least 1 when
    it has 2 rows or more; seeded per stratum."""
    if val_split <= 0:
        return list(items), []
    by_combo: dict[tuple, list] = {}
    for path, hot in items:
        by_combo.setdefault(tuple(hot), []).append(path)
    groups = [
        (";".join(map(str, combo)), [(p, combo) for p in ps]) for combo, ps in by_combo.items() if len(ps) > 1
    ]
    # combinations seen once are pooled, so rare ones still reach val in proportion
    groups.append(("", [(p, combo) for combo, ps in by_combo.items() if len(ps) == 1 for p in ps]))
    train: Items = []
    val: Items = []
    for key, rows in sorted(groups, key=lambda g: g[0]):
        rows.sort(key=lambda r: _path_key(r[0]))
        n = len(rows)
        n_val = min(max(round(n * val_split), 1), n - 1) if n >= 2 else 0
        order = np.random.default_rng([seed, zlib.crc32(key.encode())]).permutation(n)
        chosen = set(order[:n_val].tolist())
        val.extend(r for i, r in enumerate(rows) if i in chosen)
        train.extend(r for i, r in enumerate(rows) if i not in chosen)
    return train, val


def _is_header(cells: list[str]) -> bool:
    """A first row naming its columns: its first cell is a word like ``file``,
    which no data row can be (those need an image file extension)."""
    return cells[0].lower() in _HEADER_FILE
