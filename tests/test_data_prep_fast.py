"""The fast paths of data preparation give the same answers as the plain ones:
chunked decode, workers writing into the cache file, channel sums kept in the
cache entry, string paths from the folder scan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import cache, loader, prepare, prepare_data
from imgcls.data.cache import load_split
from imgcls.data.decode import channel_sums, decode_row, decode_rows
from imgcls.data.sources import stratified_split
from imgcls.recipe import DataSpec


def _images(folder: Path, n: int = 24) -> list[Path]:
    """Mixed modes and sizes, one unreadable file at index 5."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{i:02d}.png"
        if i == 5:
            p.write_bytes(b"not a png")
        else:
            mode = ("RGB", "L", "RGBA", "P")[i % 4]
            size = (8, 8) if i % 3 else (11, 6)
            Image.new(mode, size, (i * 9, 40, 200 - i)[: len(mode)] if mode != "P" else i).save(p)
        paths.append(p)
    return paths


@pytest.mark.parametrize("channels", [1, 3])
def test_decode_rows_equals_decode_row_and_leaves_failed_rows(tmp_path, channels):
    paths = _images(tmp_path)
    fast = np.full((len(paths), channels, 8, 8), 7, np.uint8)
    failures = decode_rows(paths, fast, channels, (8, 8), "center_crop")
    assert [i for i, _ in failures] == [5]
    for i, p in enumerate(paths):
        if i == 5:
            assert (fast[i] == 7).all()  # left as it was
            continue
        one = np.zeros((channels, 8, 8), np.uint8)
        decode_row(p, one, channels, (8, 8), "center_crop")
        assert np.array_equal(fast[i], one), p


def test_channel_sums_are_exact_at_any_chunk():
    x = np.random.default_rng(0).integers(0, 256, (301, 3, 5, 7), dtype=np.uint8)
    wide = x.astype(np.int64)
    want = np.stack([wide.sum(axis=(0, 2, 3)), (wide * wide).sum(axis=(0, 2, 3))])
    for chunk in (1, 64, 4096):
        assert np.array_equal(channel_sums(x, chunk), want)


def test_workers_write_the_cache_file_like_the_serial_path(tmp_path, monkeypatch):
    """Worker processes write their rows straight into the entry being built:
    the same rows, failures and pixel sums as decoding in this process."""
    items = [(p, 0) for p in _images(tmp_path / "img", 60)]
    spec = DataSpec(image_size=8, cache="disk")
    monkeypatch.setenv("IMGCLS_DECODE", "serial")
    serial = load_split(items, spec, tmp_path / "c1")
    monkeypatch.setenv("IMGCLS_DECODE", "processes")
    workers = load_split(items, spec, tmp_path / "c2")
    assert torch.equal(serial.x, workers.x) and len(workers) == 59
    assert [str(p) for p, _ in workers.bad] == [str(items[5][0])]
    assert np.array_equal(workers.sums, channel_sums(workers.x.numpy()))
    assert np.array_equal(serial.sums, workers.sums)


def test_cached_run_reads_mean_std_from_the_entry(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    for c, cls in enumerate("ab"):
        (tmp_path / "d" / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (6, 6), (c * 90 + i * 7, 3 * i, 250 - i)).save(tmp_path / "d" / cls / f"{i}.png")
    spec = DataSpec(source="folder", path="d", image_size=6)
    first = prepare_data(spec, tmp_path)
    assert (first.mean, first.std) == loader.compute_mean_std(first.train.x)
    meta = json.loads(next((tmp_path / "cache" / "decoded").glob("*/meta.json")).read_text())
    assert len(meta["sums"]) == 2 and len(meta["sums"][0]) == 3

    def no_pixel_reads(*args, **kwargs):
        raise AssertionError("a cached run must not read every pixel for mean/std")

    monkeypatch.setattr(prepare, "compute_mean_std", no_pixel_reads)
    monkeypatch.setattr(cache, "channel_sums", no_pixel_reads)
    again = prepare_data(spec, tmp_path)
    assert (again.mean, again.std) == (first.mean, first.std)


def test_string_paths_split_exactly_like_paths():
    """The folder scan now gives str paths: the seeded split must be the one
    Paths gave (Path order is by components: "a/x" before "a.b/y")."""
    names = ["/d/c/a/x.png", "/d/c/a.b/y.png", "/d/c/a-1.png", "/d/c/b.png", "/d/c/a/a/z.png"]
    names += [f"/d/c/{i}.png" for i in range(20)]
    as_str = [(n, 0) for n in names]
    as_path = [(Path(n), 0) for n in names]
    s_train, s_val = stratified_split(as_str, ["c"], 0.3, 7)
    p_train, p_val = stratified_split(as_path, ["c"], 0.3, 7)
    assert [str(p) for p, _ in p_train] == [s for s, _ in s_train]
    assert [str(p) for p, _ in p_val] == [s for s, _ in s_val]
