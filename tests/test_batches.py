"""Batch sources (imgcls.data.batches): the same bytes from the device, pinned-host
and disk-streaming sources; streaming memory bounded; streamed training exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_RECIPE
from safetensors.torch import load_file

from imgcls.data import batches
from imgcls.recipe import recipe_from_dict
from imgcls.training import train

CPU = torch.device("cpu")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 8 rows and windows of 4 chunks, so tiny data has many of both."""
    monkeypatch.setattr(batches, "CHUNK_ROWS", 8)
    monkeypatch.setattr(batches, "WINDOW_BYTES", 4 * 8 * 3 * 4 * 4)


@pytest.fixture
def split(tmp_path):
    """300 rows of 3x4x4 uint8 in a file, mapped like the decoded cache, plus labels."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (300, 3, 4, 4), dtype=torch.uint8, generator=gen)
    file = tmp_path / "rows.u8"
    x.numpy().tofile(file)
    mapped = torch.from_numpy(np.memmap(file, dtype=np.uint8, mode="c", shape=tuple(x.shape)))
    y = torch.randint(0, 5, (300,), generator=gen)
    return x, mapped, file, y


def test_three_sources_give_identical_batches(split, small_chunks):
    x, mapped, file, y = split
    ram = batches.open_batches(x, y, CPU, max_batch=32, mode="device")
    host = batches.open_batches(mapped, y, CPU, max_batch=32, mode="host")
    # a pool of 3 chunks: batches spread wider than that take the row-by-row path
    stream = batches.open_batches(mapped, y, CPU, max_batch=32, file=file, mode="stream", budget=3 * 8 * 48)
    assert (ram.mode, host.mode, stream.mode) == ("device", "host", "stream")
    order = batches.epoch_order(300, 48, torch.Generator().manual_seed(1))
    wide = torch.randperm(300, generator=torch.Generator().manual_seed(2))
    for idx in [order[:32], order[32:64], wide[:32], torch.tensor([299, 0, 7, 8, 299])]:
        xr, yr = ram.batch(idx)
        assert torch.equal(xr, x[idx]) and torch.equal(yr, y[idx])
        for other in (host, stream):
            xo, yo = other.batch(idx)
            assert torch.equal(xo, xr) and torch.equal(yo, yr)
    stream.close()


def test_stream_reads_each_chunk_about_once_per_epoch_in_a_bounded_pool(split, small_chunks):
    _, mapped, file, y = split
    n_chunks = -(-300 // 8)
    window = batches.WINDOW_BYTES
    stream = batches.open_batches(
        mapped, y, CPU, max_batch=16, file=file, mode="stream", budget=window + 16 * 8 * 48
    )
    assert stream.pool_bytes <= window + 16 * 8 * 48 < mapped.numel()  # never the whole split
    order = batches.epoch_order(300, 48, torch.Generator().manual_seed(3))
    for i in range(0, 300, 16):
        stream.batch(order[i : i + 16])
    assert stream.reads <= n_chunks + 2  # one sequential read per chunk (a window edge may re-read)
    # a plain shuffle through the same pool reads far more: the order is what keeps reads sequential
    stream2 = batches.open_batches(mapped, y, CPU, max_batch=16, file=file, mode="stream", budget=window)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    for i in range(0, 300, 16):
        stream2.batch(perm[i : i + 16])
    assert stream2.reads > 2 * n_chunks
    stream.close(), stream2.close()


def test_epoch_order_is_a_seeded_permutation(small_chunks):
    a = batches.epoch_order(300, 48, torch.Generator().manual_seed(5))
    assert torch.equal(a.sort().values, torch.arange(300))
    assert torch.equal(a, batches.epoch_order(300, 48, torch.Generator().manual_seed(5)))
    # small splits keep the plain randperm (runs trained before this module keep their order)
    small = batches.epoch_order(10, 48, torch.Generator().manual_seed(5))
    assert torch.equal(small, torch.randperm(10, generator=torch.Generator().manual_seed(5)))


def test_auto_streams_a_mapped_split_larger_than_the_memory_limit(split, monkeypatch):
    x, mapped, file, y = split
    assert batches.open_batches(mapped, y, CPU, max_batch=8, file=file).mode == "device"
    monkeypatch.setattr(batches, "process_memory_limit", lambda: 1000)  # 1 KB "left"
    assert batches.open_batches(mapped, y, CPU, max_batch=8, file=file).mode == "stream"
    assert batches.open_batches(x, y, CPU, max_batch=8).mode == "device"  # in RAM: nothing to stream from


@pytest.mark.slow
def test_streamed_training_gives_the_ram_runs_weights(tmp_path, small_chunks, monkeypatch):
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["train"].update(deterministic=True, epochs=2)
    raw["data"]["augment"] = {"hflip": True}
    raw["data"]["cache"] = "disk"
    recipe = recipe_from_dict(raw)
    ram = train(recipe, out=tmp_path / "ram", log=lambda m: None)
    monkeypatch.setattr(batches, "process_memory_limit", lambda: 4000)  # pool of one chunk
    streamed = train(recipe, out=tmp_path / "stream", log=lambda m: None)
    info = [json.loads((r.run_dir / "run.json").read_text())["batches"] for r in (ram, streamed)]
    assert info == ["device", "stream"]
    a, b = (load_file(str(r.run_dir / "last.safetensors")) for r in (ram, streamed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_imgcls_batches_forces_the_stream_and_bad_values_are_one_line(cli, tmp_path, monkeypatch):
    """IMGCLS_BATCHES=stream streams a disk-cached split (the matrix uses it under DDP and tune);
    a split held in RAM, or a value that is no source, is refused before any run folder."""
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["data"]["cache"] = "disk"
    (tmp_path / "disk.yaml").write_text(json.dumps(raw))
    raw["data"]["cache"] = "none"
    (tmp_path / "ram.yaml").write_text(json.dumps(raw))
    monkeypatch.setenv("IMGCLS_BATCHES", "stream")
    result = cli("train", str(tmp_path / "disk.yaml"), "--out", str(tmp_path / "s"))
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "s" / "run.json").read_text())["batches"] == "stream"
    result = cli("train", str(tmp_path / "ram.yaml"), "--out", str(tmp_path / "r"))
    assert (
        result.returncode == 2
        and "IMGCLS_BATCHES=stream" in result.stderr
        and "data.cache: disk" in result.stderr
    )
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [
        result.stderr.strip().splitlines()[-1]
    ]
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("IMGCLS_BATCHES", "disk")
    result = cli("train", str(tmp_path / "disk.yaml"), "--out", str(tmp_path / "d"))
    assert result.returncode == 2 and "IMGCLS_BATCHES='disk': choose one of" in result.stderr
    assert not (tmp_path / "d").exists()
