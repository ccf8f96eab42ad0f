"""Checkpoints: self-describing, no pickle, round trips, atomic, clear errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from imgcls.checkpoint import atomic_path, load_checkpoint, read_meta, save_checkpoint
from imgcls.errors import CheckpointError
from imgcls.models.build import build_model
from imgcls.recipe import recipe_from_dict, recipe_to_dict


def _save(path, raw: dict, shape=(3, 32, 32), classes=("a", "b", "c")):
    recipe = recipe_from_dict(raw)
    torch.manual_seed(0)
    model = build_model(recipe.model, shape, len(classes)).eval()
    meta = {
        "recipe": recipe_to_dict(recipe),
        "classes": list(classes),
        "input_shape": list(shape),
        "preprocessing": {
            "image_size": list(shape[1:]),
            "channels": shape[0],
            "mean": [0.5] * shape[0],
            "std": [0.25] * shape[0],
            "resize": "stretch",
        },
    }
    save_checkpoint(path, model, meta)
    return model


# mnasnet reads a module version from the state-dict metadata; regnet computes widths from tensors
@pytest.mark.parametrize("arch", ["mnasnet0_5", "regnet_x_400mf", "googlenet"])
def test_named_architectures_round_trip(tmp_path, arch):
    model = _save(tmp_path / "m.safetensors", {"model": {"arch": arch}}, shape=(3, 64, 64))
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))
    assert loaded.classes == ["a", "b", "c"]
    assert not loaded.model.training


def test_recipe_round_trip_and_metadata(tmp_path):
    raw = {"model": {"layers": [{"conv": {"filters": 4, "batch_norm": True}}, "global_avg_pool"]}}
    model = _save(tmp_path / "r.safetensors", raw)
    meta = read_meta(tmp_path / "r.safetensors")
    assert meta["format"] == "imgcls-checkpoint" and meta["classes"] == ["a", "b", "c"]
    loaded = load_checkpoint(tmp_path / "r.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded.model(x))


def test_weights_that_do_not_fit_are_refused(tmp_path):
    _save(tmp_path / "r.safetensors", {"model": {"layers": [{"conv": 4}, "global_avg_pool"]}})
    meta = read_meta(tmp_path / "r.safetensors")
    meta["recipe"]["model"]["layers"][0]["conv"]["filters"] = 5
    from safetensors.torch import load_file

    bad = tmp_path / "bad.safetensors"
    import json

    save_file(load_file(tmp_path / "r.safetensors"), bad, metadata={"imgcls": json.dumps(meta)})
    with pytest.raises(
        CheckpointError,
        match=r"bad.safetensors: weights do not fit.*conv1\.weight has shape \[4, 3, 3, 3\].*expects \[5, 3, 3, 3\]",
    ):
        load_checkpoint(bad)


def test_foreign_and_missing_files(tmp_path):
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CheckpointError, match="without imgcls metadata"):
        load_checkpoint(tmp_path / "plain.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "nope")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    """mkstemp's 0600 must not leak into run folders (checkpoints, reports, plots)."""
    import os

    from imgcls.io import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.txt", "x")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    assert (
        (tmp_path / "a.txt").stat().st_mode & 0o777
        == (tmp_path / "plain.txt").stat().st_mode & 0o777
        == 0o644
    )


def test_atomic_writes_leave_the_process_umask_alone(tmp_path, monkeypatch):
    """The umask is process-global: setting it to read it races with every other thread."""
    import os

    from imgcls.io import write_text_atomic

    def refuse(mask):
        raise AssertionError("os.umask called by library code")

    monkeypatch.setattr(os, "umask", refuse)
    write_text_atomic(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x"
