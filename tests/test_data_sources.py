"""open_source: folder trees, CSV files, shapes; splits and errors."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from PIL import Image

from imgcls.data.sources import open_source
from imgcls.errors import DataError
from imgcls.recipe import DataSpec


def make_tree(root: Path, counts: dict[str, int], size=(8, 8)) -> Path:
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.new("RGB", size, (i * 20 % 256, 0, 0)).save(root / cls / f"{i}.png")
    return root


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.stat()
        h.update(f"{p.relative_to(root)}:{st.st_mtime_ns}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def folder(path, **kw) -> DataSpec:
    return DataSpec(source="folder", path=str(path), **kw)


def test_flat_folder_is_split_stratified_and_deterministic(tmp_path):
    make_tree(tmp_path / "d", {"cat": 10, "dog": 5, "eel": 2})
    a = open_source(folder("d", val_split=0.2, split_seed=1), tmp_path)
    b = open_source(folder("d", val_split=0.2, split_seed=1), tmp_path)
    assert a.classes == ["cat", "dog", "eel"]
    assert a.train == b.train and a.val == b.val
    val_counts = [sum(1 for _, y in a.val if y == k) for k in range(3)]
    assert val_counts == [2, 1, 1]  # every class with >= 2 images gets a val image
    assert not {p for p, _ in a.train} & {p for p, _ in a.val}
    c = open_source(folder("d", val_split=0.2, split_seed=2), tmp_path)
    assert c.val != a.val


def test_train_val_test_subtrees(tmp_path):
    make_tree(tmp_path / "d" / "train", {"a": 3, "b": 3})
    make_tree(tmp_path / "d" / "val", {"a": 1, "b": 1})
    make_tree(tmp_path / "d" / "test", {"a": 2, "b": 1})
    s = open_source(folder(tmp_path / "d"), tmp_path)
    assert (len(s.train), len(s.val), len(s.test)) == (6, 2, 3)


def test_subtree_class_lists_must_agree(tmp_path):
    make_tree(tmp_path / "d" / "train", {"a": 3, "b": 3})
    make_tree(tmp_path / "d" / "val", {"a": 1, "c": 1})
    with pytest.raises(DataError, match=r"val: class folders differ.*missing b.*not in train/: c"):
        open_source(folder(tmp_path / "d"), tmp_path)


def test_hidden_and_non_image_files_are_ignored(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 2, "b": 2})
    make_tree(root / ".git", {"objects": 3})
    make_tree(root / "a" / ".thumbs", {"x": 2})
    (root / "a" / "notes.txt").write_text("hi")
    Image.new("RGB", (4, 4)).save(root / "b" / ".hidden.png")
    s = open_source(folder(root, val_split=0), tmp_path)
    assert s.classes == ["a", "b"] and len(s.train) == 4


def test_empty_class_single_class_and_missing_path(tmp_path):
    root = make_tree(tmp_path / "d", {"a": 2, "b": 2})
    (root / "empty").mkdir()
    with pytest.raises(DataError, match="empty: class folder has no images"):
        open_source(folder(root), tmp_path)
    make_tree(tmp_path / "one", {"a": 3})
    with pytest.raises(DataError, match="need at least 2 classes"):
        open_source(folder(tmp_path / "one"), tmp_path)
    with pytest.raises(DataError, match="nowhere: no such folder"):
        open_source(folder("nowhere"), tmp_path)


def test_folder_is_never_modified(tmp_path):
    from imgcls.data import prepare_data

    root = make_tree(tmp_path / "d", {"a": 4, "b": 4})
    before = tree_hash(root)
    prepare_data(folder(root, cache="disk"), tmp_path, tmp_path / "cache")
    assert tree_hash(root) == before


def test_csv_source_with_header_and_split_column(tmp_path):
    make_tree(tmp_path / "img", {"a": 3, "b": 3})
    lines = ["file,label,split"]
    lines += [f"img/a/{i}.png,a,{'val' if i == 0 else 'train'}" for i in range(3)]
    lines += [f"img/b/{i}.png,b,{'test' if i == 0 else ''}" for i in range(3)]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    s = open_source(DataSpec(source="csv", path="labels.csv"), tmp_path)
    assert s.classes == ["a", "b"]
    assert (len(s.train), len(s.val), len(s.test)) == (4, 1, 1)


def test_csv_header_names_only_the_file_column_as_a_header(tmp_path):
    make_tree(tmp_path / "img", {"a": 3, "b": 3})
    rows = ["path,species"] + [f"img/{c}/{i}.png,{c}" for c in "ab" for i in range(3)]
    (tmp_path / "l.csv").write_text("\n".join(rows))
    s = open_source(DataSpec(source="csv", path="l.csv", val_split=0.0), tmp_path)
    assert s.classes == ["a", "b"] and len(s.train) == 6


def test_csv_without_header_is_split_automatically(tmp_path):
    make_tree(tmp_path / "img", {"a": 5, "b": 5})
    rows = [f"img/{c}/{i}.png,{c}" for c in "ab" for i in range(5)]
    (tmp_path / "l.csv").write_text("\n".join(rows))
    s = open_source(DataSpec(source="csv", path="l.csv", val_split=0.2), tmp_path)
    assert (len(s.train), len(s.val)) == (8, 2)


@pytest.mark.parametrize(
    "row,message",
    [
        ("img/a/0.png", "expected 'file,label'"),
        ("img/a/missing.png,a", "no such file 'img/a/missing.png'"),
        ("img/a/0.png,a,holdout", "split 'holdout' is not"),
        ("img/a/0.txt,a", "image file extension"),
    ],
)
def test_csv_bad_row_names_the_line(tmp_path, row, message):
    make_tree(tmp_path / "img", {"a": 2, "b": 2})
    text = "file,label\nimg/a/1.png,a\nimg/b/0.png,b\n" + row + "\n"
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(DataError, match=rf"l\.csv:4: .*{message}"):
        open_source(DataSpec(source="csv", path="l.csv"), tmp_path)


def test_shapes_source_writes_once_and_reads_as_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    spec = DataSpec(shapes={"per_class": 5, "image_size": 16})
    s = open_source(spec, tmp_path)
    assert len(s.classes) == 6 and len(s) == 30
    assert s.root.is_relative_to(tmp_path / "cache")
    mtime = os.stat(s.train[0][0]).st_mtime_ns
    again = open_source(spec, tmp_path)
    assert again.train == s.train and os.stat(s.train[0][0]).st_mtime_ns == mtime


def test_a_link_back_into_the_data_set_counts_each_image_once_in_its_own_class(tmp_path):
    """square/loop -> the data set's root used to list every circle a second
    time as a "square" (3 x 4 images instead of 2 x 4); a link leading outside
    is still followed, and two links to one outside place count it once."""
    root = make_tree(tmp_path / "d", {"circle": 4, "square": 4})
    make_tree(tmp_path / "outside", {"more": 2})
    (root / "square" / "loop").symlink_to(root, target_is_directory=True)
    (root / "circle" / "up").symlink_to(root / "square", target_is_directory=True)
    (root / "circle" / "alias.png").symlink_to(root / "square" / "0.png")
    (root / "circle" / "extra").symlink_to(tmp_path / "outside" / "more", target_is_directory=True)
    (root / "square" / "extra").symlink_to(tmp_path / "outside" / "more", target_is_directory=True)
    s = open_source(folder(root, val_split=0), tmp_path)
    listed = [(os.path.relpath(p, root), s.classes[y]) for p, y in s.train]
    real = sorted(os.path.realpath(p) for p, _ in s.train)
    assert len(real) == len(set(real)) == 10, listed  # 4 + 4 + the 2 outside, once
    for path, label in listed:
        if not path.startswith(os.path.join(label, "extra")):  # inside: the class of the real path
            assert (root / path).resolve().parent.name == label, (path, label)
    assert sum(1 for _, label in listed if label == "circle") == 6  # 4 + the outside 2 (found first)


def test_a_link_from_train_into_val_does_not_leak(tmp_path):
    make_tree(tmp_path / "d" / "train", {"a": 3, "b": 3})
    make_tree(tmp_path / "d" / "val", {"a": 1, "b": 1})
    (tmp_path / "d" / "train" / "a" / "v").symlink_to(tmp_path / "d" / "val" / "a")
    s = open_source(folder(tmp_path / "d"), tmp_path)
    assert (len(s.train), len(s.val)) == (6, 2)
