"""The built-in shapes set: deterministic, atomic, keyed by its spec."""

from __future__ import annotations

import pytest

from imgcls.data.shapes import MANIFEST, is_complete, shapes_dir, write_shapes
from imgcls.errors import DataError
from imgcls.recipe import ShapesSpec


def _bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_gives_identical_bytes(tmp_path):
    spec = ShapesSpec(per_class=4, image_size=16, seed=3)
    a = write_shapes(tmp_path / "a", spec)
    b = write_shapes(tmp_path / "b", spec)
    assert _bytes(a) == _bytes(b) and len(_bytes(a)) == 24
    c = write_shapes(tmp_path / "c", ShapesSpec(per_class=4, image_size=16, seed=4))
    assert _bytes(c) != _bytes(a)
    assert (a / "star" / "star_0003.png").is_file() and (a / MANIFEST).is_file()


def test_adding_a_class_leaves_the_others_unchanged(tmp_path):
    few = write_shapes(tmp_path / "few", ShapesSpec(classes=["circle", "star"], per_class=3))
    more = write_shapes(tmp_path / "more", ShapesSpec(classes=["circle", "star", "bar"], per_class=3))
    assert (few / "star" / "star_0002.png").read_bytes() == (more / "star" / "star_0002.png").read_bytes()


def test_incomplete_folder_is_rebuilt_and_foreign_folder_kept(tmp_path):
    spec = ShapesSpec(per_class=2, image_size=8)
    out = write_shapes(tmp_path / "s", spec)
    (out / MANIFEST).write_text('{"key": "old"}')  # as if from another spec
    assert not is_complete(out, spec)
    write_shapes(out, spec)
    assert is_complete(out, spec)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="mine: exists and is not an imgcls shapes folder"):
        write_shapes(tmp_path / "mine", spec)
    assert (tmp_path / "mine" / "holiday.jpg").exists()
    assert not list(tmp_path.glob(".*tmp*"))  # no temp folders left behind


def test_cache_location_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path))
    a, b = shapes_dir(ShapesSpec(seed=1)), shapes_dir(ShapesSpec(seed=2))
    assert a.parent == tmp_path / "shapes" and a != b
    monkeypatch.delenv("IMGCLS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert shapes_dir(ShapesSpec()).is_relative_to(tmp_path / "xdg" / "imgcls")


def test_unknown_shape_is_an_error():
    with pytest.raises(DataError, match="unknown shape 'blob'"):
        write_shapes("/nonexistent", ShapesSpec(classes=["circle", "blob"]))
