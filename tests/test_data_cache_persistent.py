"""The persistent decoded cache through prepare_data, and the decode engine."""

from __future__ import annotations

import gc
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import cache, prepare_data
from imgcls.data.batch_decode import decode_into
from imgcls.data.cache import list_entries, load_split, parse_size
from imgcls.data.progress import Progress
from imgcls.errors import DataError, UsageError
from imgcls.recipe import DataSpec


def _tree(root, n=4):
    for c, cls in enumerate("ab"):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (c * 100 + i * 20, 5, 9)).save(root / cls / f"{i}.png")
    return root


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_second_run_maps_and_an_edit_decodes_only_that_file(root, decodes):
    _tree(root / "d")
    spec = DataSpec(source="folder", path="d", image_size=4)  # cache: auto persists
    first = prepare_data(spec, root)
    assert sum(decodes) == 8
    logs: list[str] = []
    again = prepare_data(spec, root, log=logs.append)
    assert sum(decodes) == 8 and len([m for m in logs if m.startswith("mapped ")]) == 2
    assert torch.equal(first.train.x, again.train.x) and torch.equal(first.val.x, again.val.x)
    # an evaluate-style caller on the same split's files hits the same entry
    items = list(zip(first.val.files, first.val.y.tolist(), strict=False))
    assert torch.equal(load_split(items, spec).x, first.val.x) and sum(decodes) == 8

    victim = first.train.files[0]
    Image.new("RGB", (8, 8), (1, 2, 3)).save(victim)
    (root / "d" / "b" / "3.png").unlink()  # victim is in class a
    del first, again  # an entry in use is never replaced: let these go
    gc.collect()
    decodes.clear()
    logs.clear()
    third = prepare_data(spec, root, log=logs.append)
    assert sum(decodes) == 1  # the edited file; removed and unchanged files cost nothing
    assert third.train.x[third.train.files.index(victim), :, 0, 0].tolist() == [1, 2, 3]
    assert len(list_entries()) == 2  # the new entries replaced the old ones


def test_cache_none_writes_nothing(root, decodes):
    _tree(root / "d")
    spec = DataSpec(source="folder", path="d", image_size=4, cache="none")
    prepare_data(spec, root)
    prepare_data(spec, root)
    assert sum(decodes) == 16 and not (root / "cache" / "decoded").exists()


def test_ram_policy_reuses_the_cache_and_holds_a_copy(root, decodes):
    _tree(root / "d")
    spec = DataSpec(source="folder", path="d", image_size=4, cache="ram")
    prepare_data(spec, root)
    data = prepare_data(spec, root)
    assert sum(decodes) == 8 and data.train.x.is_contiguous()
    data.train.x[0] = 0  # a copy in RAM: writable, the cache file untouched
    assert prepare_data(spec, root).train.x[0].sum() > 0


def test_size_cap_evicts_least_recently_used(root, monkeypatch):
    _tree(root / "d")
    spec4 = DataSpec(source="folder", path="d", image_size=4, val_split=0)
    prepare_data(spec4, root)
    size = list_entries()[0]["bytes"]
    monkeypatch.setenv("IMGCLS_CACHE_MAX", str(int(size * 1.5)))
    logs: list[str] = []
    prepare_data(DataSpec(source="folder", path="d", image_size=5, val_split=0), root, log=logs.append)
    assert [e["key"] for e in list_entries()] != [] and len(list_entries()) == 1
    assert any("evicted" in m for m in logs)


def test_interrupt_leaves_no_entry(root, monkeypatch):
    _tree(root / "d")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache, "decode_into", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(DataSpec(source="folder", path="d", image_size=4), root)
    decoded = root / "cache" / "decoded"
    assert list_entries() == [] and not list(decoded.glob(".tmp-*"))


def test_parse_size():
    assert parse_size("20G") == 20 * 1024**3 and parse_size("1.5k") == 1536 and parse_size("7") == 7
    assert parse_size("500MiB") == 500 * 1024**2
    with pytest.raises(UsageError, match="IMGCLS_CACHE_MAX='lots'"):
        parse_size("lots")


def test_empty_folder_names_it(root):
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no class folders found"):
        prepare_data(DataSpec(source="folder", path="empty"), root)


@pytest.mark.parametrize("mode", ["serial", "threads"])
def test_decode_modes_give_the_same_rows(tmp_path, mode):
    paths = []
    for i in range(40):
        p = tmp_path / f"{i}.png"
        Image.new("L", (6, 6), i * 5).save(p)
        paths.append(p)
    (tmp_path / "bad.png").write_bytes(b"nope")
    paths.insert(7, tmp_path / "bad.png")
    out = np.zeros((41, 1, 3, 3), np.uint8)
    failures = decode_into(out, paths, 1, (3, 3), "stretch", workers=2, mode=mode)
    assert [i for i, _ in failures] == [7]
    assert out[8, 0, 0, 0] == 35 and out[40, 0, 0, 0] == 195


@pytest.mark.slow
def test_decode_in_processes_gives_the_same_rows(tmp_path):
    """Spawned workers (no torch import) write the same rows as the serial path."""
    paths = []
    for i in range(60):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (9, 7), (i, 2 * i, 3)).save(p)
        paths.append(p)
    a = np.zeros((60, 3, 4, 4), np.uint8)
    b = np.zeros_like(a)
    decode_into(a, paths, 3, (4, 4), "center_crop", mode="serial")
    assert decode_into(b, paths, 3, (4, 4), "center_crop", workers=2, mode="processes") == []
    assert np.array_equal(a, b)


@pytest.mark.slow
def test_threads_decoding_in_processes_at_once_share_no_pool_and_leave_main_alone(tmp_path):
    """Each caller owns its DecodePool; __main__ is never swapped (threads raced on that swap)."""
    import threading

    from imgcls.data.batch_decode import DecodePool

    paths = []
    for i in range(60):
        p = tmp_path / f"{i}.png"
        Image.new("RGB", (9, 7), (i, 2 * i, 3)).save(p)
        paths.append(p)
    expected = np.zeros((60, 3, 4, 4), np.uint8)
    decode_into(expected, paths, 3, (4, 4), "stretch", mode="serial")
    main, seen, done = sys.modules["__main__"], [], threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.append(sys.modules["__main__"] is main)
            time.sleep(0.001)

    results = [np.zeros_like(expected) for _ in range(3)]

    errors: list[BaseException] = []

    def decode(out) -> None:
        try:
            decode_owned(out)
        except BaseException as exc:  # noqa: BLE001  (asserted below)
            errors.append(exc)

    def decode_owned(out) -> None:
        with DecodePool() as pool:
            for _ in range(2):  # the second call finds the pool warm
                assert (
                    decode_into(out, paths, 3, (4, 4), "stretch", workers=2, mode="processes", pool=pool)
                    == []
                )
                assert pool.ready(2)
        assert not pool.ready(2)  # closed with the block

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=decode, args=(out,)) for out in results]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors and all(seen) and sys.modules["__main__"] is main
    assert all(np.array_equal(out, expected) for out in results)


def test_plain_progress_lines_have_rate_and_eta(monkeypatch):
    monkeypatch.setattr("imgcls.data.progress.PLAIN_EVERY_S", 0.0)
    lines: list[str] = []
    with Progress(lines.append).task("decoding train", total=10) as task:
        task.advance(5)
    with Progress(lines.append).task("listing") as task:
        task.advance(7)
    assert lines[0].startswith("decoding train: 5/10 (50%),") and "/s, ETA " in lines[0]
    assert lines[1].startswith("listing: 7 found,")


def test_decompression_bomb_is_our_one_line_not_a_warning(tmp_path):
    """Pillow's DecompressionBombWarning must not reach stderr before our error."""
    big = tmp_path / "big.png"
    Image.new("L", (30, 30)).save(big)  # 900 pixels; the limit below is 600
    code = (
        "from PIL import Image\n"
        "from imgcls.data.decode import DecodeError, decode_image\n"
        "Image.MAX_IMAGE_PIXELS = 600\n"
        "try:\n"
        f"    decode_image({str(big)!r}, 1)\n"
        "except DecodeError as exc:\n"
        "    print(exc.reason)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and r.stderr == ""
    assert r.stdout.startswith("refused, too many pixels")
