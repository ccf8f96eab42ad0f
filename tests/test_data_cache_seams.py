"""The decoded cache where it meets its cap, other processes and an unusable folder."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from conftest import TINY_RECIPE
from PIL import Image

from imgcls.data import prepare_data
from imgcls.data.batches import open_batches
from imgcls.data.cache import list_entries, load_split
from imgcls.recipe import DataSpec


def _tree(root, classes=3, per_class=40, size=16):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


def test_a_cap_below_one_runs_data_keeps_its_splits_and_the_next_runs_map_them(
    tmp_path, monkeypatch, decodes
):
    # 3 x 40 images at 16 px: each split fits 100K, the run's splits together do not
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("IMGCLS_CACHE_MAX", "100K")
    _tree(tmp_path / "d")
    spec = DataSpec(source="folder", path="d", image_size=16)
    logs: list[str] = []
    run = prepare_data(spec, tmp_path, log=logs.append)
    assert sum(decodes) == 120
    # writing val did not evict train: its file is there, and streaming it reads every row
    assert run.train.file.exists() and run.val.file.exists()
    stream = open_batches(
        run.train.x, run.train.y, run.train.x.device, max_batch=8, file=run.train.file, mode="stream"
    )
    assert stream.n == len(run.train)
    stream.close()
    warned = [m for m in logs if "IMGCLS_CACHE_MAX" in m]
    assert len(warned) == 1 and warned[0].startswith("warning: "), logs
    del run, stream
    gc.collect()
    for _ in range(2):  # the next runs map what the first decoded
        decodes.clear()
        logs.clear()
        again = prepare_data(spec, tmp_path, log=logs.append)
        assert decodes == [] and len([m for m in logs if m.startswith("mapped ")]) == 2, logs
        assert len([m for m in logs if "IMGCLS_CACHE_MAX" in m]) == 1
        del again
        gc.collect()


def test_an_entry_in_use_is_never_evicted(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_CACHE_MAX", "1K")
    cache = tmp_path / "c"
    items_a = [(p, 0) for p in sorted(_tree(tmp_path / "a", 1, 8).rglob("*.png"))]
    items_b = [(p, 0) for p in sorted(_tree(tmp_path / "b", 1, 8).rglob("*.png"))]
    spec = DataSpec(image_size=16, cache="disk")
    a = load_split(items_a, spec, cache)  # held while `a` lives (another process's hold is the same lock)
    b = load_split(items_b, spec, cache)  # over the cap: eviction runs, and must spare a
    assert a.file.exists() and b.file.exists()
    key_a = a.file.parent.name
    del a
    gc.collect()
    load_split(items_b, spec, cache)  # b is in use again; a no longer is: a goes
    assert [e["key"] for e in list_entries(cache)] == [b.file.parent.name] and key_a != b.file.parent.name


@pytest.mark.slow
def test_two_trains_at_once_on_one_folder_share_one_intact_entry_per_split(tmp_path):
    data = _tree(tmp_path / "d", 3, 12)
    recipe = json.loads(json.dumps(TINY_RECIPE))
    recipe["data"] = {"source": "folder", "path": str(data), "image_size": 16}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    env = {
        **os.environ,
        "IMGCLS_CACHE": str(tmp_path / "cache"),
        "IMGCLS_CACHE_MAX": "30K",  # each split fits, not both: every eviction meets entries in use
        "IMGCLS_DECODE": "serial",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "imgcls", "train", "r.yaml", "--out", f"run{i}", "-q"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert [code for code, _ in results] == [0, 0], results
    decoded = tmp_path / "cache" / "decoded"
    entries = list_entries(decoded)
    assert sorted(e["split"] for e in entries) == ["train", "val"], entries
    for e in entries:  # intact: the rows file holds every image the entry lists
        meta = json.loads((decoded / e["key"] / "meta.json").read_text())
        assert (decoded / e["key"] / "rows.u8").stat().st_size == meta["images"] * 3 * 16 * 16
    assert not list(decoded.glob(".tmp-*"))


def test_built_in_data_with_the_cache_set_to_a_file_falls_back_with_one_warning(tmp_path, monkeypatch, cli):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(TINY_RECIPE))
    r = cli(
        "train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), env={"IMGCLS_CACHE": str(blocker)}
    )
    assert r.returncode == 0, r.stderr
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(blocker) in warnings[0], r.stderr
    assert list((tmp_path / "tmp").glob("imgcls-*/shapes/*/circle/*.png")), (
        "the shapes set went to the temp folder"
    )
    assert blocker.read_text() == "x"
