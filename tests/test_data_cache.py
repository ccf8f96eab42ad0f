"""load_split / prepare_data: decode once, skip bad files, disk cache keys."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from PIL import Image

from imgcls.data import default_cache_dir, prepare_data
from imgcls.data.cache import check_bad, load_split
from imgcls.errors import DataError
from imgcls.recipe import DataSpec


def _items(tmp_path, n=6, bad=0):
    items = []
    for i in range(n):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (10, 6), (i * 40, 10, 200)).save(p)
        items.append((p, i % 2))
    for j in range(bad):
        p = tmp_path / f"bad{j}.png"
        p.write_bytes(b"\x89PNG broken")
        items.append((p, 0))
    return items


@pytest.mark.parametrize("cache", ["ram", "disk", "none", "auto"])
def test_load_split_decodes_and_skips_bad(tmp_path, cache):
    items = _items(tmp_path, 6, bad=2)
    logs = []
    spec = DataSpec(image_size=(4, 5), cache=cache)
    d = load_split(items, spec, tmp_path / "cache", logs.append)
    assert d.x.dtype == torch.uint8 and d.x.shape == (6, 3, 4, 5)
    assert d.y.tolist() == [0, 1, 0, 1, 0, 1] and d.y.dtype == torch.int64
    assert [p.name for p, _ in d.bad] == ["bad0.png", "bad1.png"]
    assert len(d.files) == 6 and any("bad0.png" in m for m in logs)
    assert d.x[2, 0, 0, 0] == 80  # row order follows the ok files
    written = list((tmp_path / "cache").glob("*/rows.u8"))
    assert written if cache in ("disk", "auto", "ram") else not (tmp_path / "cache").exists()


def test_disk_cache_is_reused_and_invalidated(tmp_path, decodes):
    items = _items(tmp_path, 4)
    spec = DataSpec(image_size=4, cache="disk")
    first = load_split(items, spec, tmp_path / "c")
    assert decodes == [4]
    logs = []
    again = load_split(items, spec, tmp_path / "c", logs.append)
    assert torch.equal(first.x, again.x) and decodes == [4]  # mapped, not decoded
    assert [m for m in logs if m.startswith("mapped 4 decoded images")]
    Image.new("RGB", (10, 6), (1, 2, 3)).save(items[0][0])  # alter a file
    os.utime(items[0][0], ns=(1, 1))
    logs.clear()
    changed = load_split(items, spec, tmp_path / "c", logs.append)
    # only the changed file is decoded; the other three rows are reused
    assert changed.x[0, :, 0, 0].tolist() == [1, 2, 3] and decodes == [4, 1]
    assert torch.equal(changed.x[1:], first.x[1:])
    assert [m for m in logs if m.startswith("cached 4 decoded images") and "(1 decoded, 3 reused)" in m]
    del first, again  # an entry in use is never replaced: let the old one go
    gc.collect()
    other = load_split(items, DataSpec(image_size=5, cache="disk"), tmp_path / "c")
    assert other.x.shape[-1] == 5
    # the changed split replaced its old entry; the other geometry has its own
    assert len(list((tmp_path / "c").glob("*/rows.u8"))) == 2


def test_check_bad_refuses_over_the_limit(tmp_path):
    bad = [(tmp_path / f"{i}.png", "cannot decode") for i in range(5)]
    check_bad(bad[:1], 100, 0.01)
    with pytest.raises(DataError, match=r"5 of 100 images could not be read.*0\.png.*and 2 more"):
        check_bad(bad, 100, 0.01)


def test_prepare_data_enforces_max_bad_fraction(tmp_path):
    for cls in "ab":
        _items(tmp_path / cls if (tmp_path / cls).mkdir() is None else None, 4, bad=1)
    with pytest.raises(DataError, match="2 of 10 images could not be read"):
        prepare_data(DataSpec(source="folder", path=".", image_size=4), tmp_path)
    data = prepare_data(DataSpec(source="folder", path=".", image_size=4, max_bad_fraction=0.5), tmp_path)
    assert data.classes == ["a", "b"] and len(data.bad) == 2
    assert len(data.train) + len(data.val) == 8 and len(data.mean) == 3


def test_prepare_data_disk_cache_defaults_under_the_cache_root(tmp_path, monkeypatch, decodes):
    """With no cache_dir, ``cache: disk`` still caches (under $IMGCLS_CACHE/decoded),
    and a second run maps the cache instead of decoding again."""
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache-root"))
    for cls in "ab":
        (tmp_path / "d" / cls).mkdir(parents=True)
        _items(tmp_path / "d" / cls, 4)
    spec = DataSpec(source="folder", path="d", image_size=4, cache="disk")
    assert default_cache_dir() == tmp_path / "cache-root" / "decoded"
    logs: list[str] = []
    first = prepare_data(spec, tmp_path, log=logs.append)
    assert sum(decodes) == 8 and list(default_cache_dir().glob("*/rows.u8"))
    assert not [m for m in logs if "no cache folder" in m]
    logs.clear()
    again = prepare_data(spec, tmp_path, log=logs.append)
    assert sum(decodes) == 8  # nothing decoded the second time
    assert len([m for m in logs if m.startswith("mapped ")]) == 2  # train and val
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.val.x, again.val.x)
