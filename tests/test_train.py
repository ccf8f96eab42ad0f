"""Training: determinism, exact resume, run folders, errors a user sees."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE, invoke_cli
from safetensors.torch import load_file

from imgcls.errors import CheckpointError, Interrupted
from imgcls.recipe import recipe_from_dict
from imgcls.training import train
from imgcls.training.schedule import lr_at


def tiny(**train_overrides) -> dict:
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["train"].update(train_overrides)
    return raw


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def quiet(_: str) -> None:
    pass


def test_deterministic_runs_give_bit_identical_weights(tmp_path):
    raw = tiny(epochs=2, deterministic=True, optimizer="sgd")
    raw["data"]["augment"] = {"hflip": True, "random_crop": 2}
    recipe = recipe_from_dict(raw)
    a = train(recipe, out=tmp_path / "a", log=quiet)
    b = train(recipe, out=tmp_path / "b", log=quiet)
    assert same_weights(a.run_dir / "last.safetensors", b.run_dir / "last.safetensors")
    assert a.history[-1]["train_loss"] == b.history[-1]["train_loss"]
    # and a different seed really gives different weights (the check can fail)
    raw["train"]["seed"] = 1
    other = recipe_from_dict(raw)
    c = train(other, out=tmp_path / "c", log=quiet)
    assert not same_weights(a.run_dir / "last.safetensors", c.run_dir / "last.safetensors")


@pytest.mark.parametrize("stop_after", [1, 3])  # inside epoch 1, and inside epoch 2
def test_resumed_run_ends_with_the_same_weights(tmp_path, stop_after):
    raw = tiny(epochs=3, optimizer={"name": "adamw", "lr": 3e-3}, schedule="cosine", ema=0.9)
    raw["model"]["layers"].insert(2, {"dropout": 0.2})
    raw["data"]["augment"] = {"hflip": True, "mixup": 0.2}
    recipe = recipe_from_dict(raw)
    whole = train(recipe, out=tmp_path / "whole", log=quiet)

    with pytest.raises(Interrupted, match="Resume with: imgcls train --resume"):
        train(recipe, out=tmp_path / "parts", log=quiet, stop_after_steps=stop_after)
    assert (tmp_path / "parts" / "resume.pt").exists()
    parts = train(recipe, resume=tmp_path / "parts", log=quiet)

    assert same_weights(whole.run_dir / "last.safetensors", parts.run_dir / "last.safetensors")
    assert same_weights(whole.run_dir / "best.safetensors", parts.run_dir / "best.safetensors")
    assert [h["train_loss"] for h in whole.history] == [h["train_loss"] for h in parts.history]
    # the temperature fitted at the end (imgcls.calibration): that of the uninterrupted run
    assert parts.calibration == whole.calibration and whole.calibration["fitted_on"] is not None


def test_a_save_cut_off_between_its_two_files_resumes_from_the_pair_before(tmp_path, monkeypatch, cli):
    """last.safetensors and resume.pt are one commit: a kill (here an exception)
    between the two writes leaves new weights beside the old optimizer state.
    Mixed, the resumed run went on from the wrong step; now it falls back to
    the previous pair, or, with none kept, refuses in one line naming both."""
    import shutil

    from imgcls import checkpoint as ck

    monkeypatch.setattr("imgcls.training.loop._plot", lambda *args: None)  # curves.png: 60% of a tiny run's time
    recipe = recipe_from_dict(tiny(epochs=2, deterministic=True, optimizer="sgd", ema=0.9))
    whole = train(recipe, out=tmp_path / "whole", log=quiet)
    real, saves = ck.save_resume, []

    def cut_off(path, state):  # the second save dies between last.safetensors and resume.pt
        saves.append(path)
        if len(saves) == 2:
            raise KeyboardInterrupt
        real(path, state)

    monkeypatch.setattr(ck, "save_resume", cut_off)
    with pytest.raises(KeyboardInterrupt):
        train(recipe, out=tmp_path / "cut", log=quiet)
    monkeypatch.setattr(ck, "save_resume", real)
    kept = shutil.copytree(tmp_path / "cut", tmp_path / "no_previous")
    (kept / ck.PREVIOUS).unlink()  # as on a file system without hard links

    said = []
    resumed = train(recipe, resume=tmp_path / "cut", log=said.append)
    assert any("a save was cut off before resume.pt followed it" in line for line in said), said
    assert same_weights(whole.run_dir / "last.safetensors", resumed.run_dir / "last.safetensors")
    assert same_weights(whole.run_dir / "best.safetensors", resumed.run_dir / "best.safetensors")
    assert sorted(p.name for p in resumed.run_dir.iterdir()) == sorted(p.name for p in whole.run_dir.iterdir())

    refused = cli("train", "--resume", str(kept))
    assert refused.returncode == 2
    line = refused.stderr.strip().splitlines()[-1]
    assert f"{kept / 'last.safetensors'} (generation 2)" in line, refused.stderr
    assert f"{kept / 'resume.pt'} (generation 1) are from different saves" in line


def test_resume_refuses_another_architecture(tmp_path):
    recipe = recipe_from_dict(tiny())
    with pytest.raises(Interrupted):
        train(recipe, out=tmp_path / "run", log=quiet, stop_after_steps=1)
    raw = tiny()
    raw["model"]["layers"][0]["conv"]["filters"] = 6
    with pytest.raises(CheckpointError, match="architecture"):
        train(recipe_from_dict(raw), resume=tmp_path / "run", log=quiet)


def test_resume_refuses_another_class_list(tmp_path):
    recipe = recipe_from_dict(tiny())
    with pytest.raises(Interrupted):
        train(recipe, out=tmp_path / "run", log=quiet, stop_after_steps=1)
    raw = tiny()
    raw["data"]["shapes"]["classes"] = ["circle", "square", "star"]
    with pytest.raises(CheckpointError, match="classes"):
        train(recipe_from_dict(raw), resume=tmp_path / "run", log=quiet)


def test_early_stopping_stops(tmp_path):
    recipe = recipe_from_dict(
        tiny(
            epochs=30,
            optimizer={"name": "sgd", "lr": 1e-9},
            early_stopping={"monitor": "val_loss", "patience": 2, "min_delta": 1.0},
        )
    )
    result = train(recipe, out=tmp_path / "run", log=quiet)
    assert result.stopped_early
    assert len(result.history) == 3  # first epoch sets the best, two without improvement


def test_schedules():
    from imgcls.recipe import ScheduleSpec

    cos = ScheduleSpec(name="cosine", warmup_epochs=1)
    assert lr_at(0, 100, 10, 1.0, cos) == pytest.approx(0.1)  # warmup ramps
    assert lr_at(10, 100, 10, 1.0, cos) == pytest.approx(1.0)
    assert lr_at(99, 100, 10, 1.0, cos) < 0.01
    step = ScheduleSpec(name="step", step_size=2, gamma=0.5)
    assert [lr_at(s, 100, 10, 1.0, step) for s in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    one = ScheduleSpec(name="onecycle")
    peak = max(lr_at(s, 100, 10, 1.0, one) for s in range(100))
    assert peak == pytest.approx(1.0, rel=0.05) and lr_at(0, 100, 10, 1.0, one) < 0.1


def write_recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_cli_train_writes_a_complete_run_folder(tmp_path, cli):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny(epochs=2))
    result = cli("train", str(recipe), "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    run = tmp_path / "runs" / "tiny" / "1"
    assert Path(summary["run_dir"]) == Path("runs/tiny/1") and summary["epochs"] == 2
    for name in (
        "best.safetensors",
        "last.safetensors",
        "resume.pt",
        "metrics.csv",
        "curves.png",
        "recipe.yaml",
        "summary.txt",
    ):
        assert (run / name).is_file(), name
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert 0 <= float(rows[-1]["val_acc"]) <= 1
    assert not list(run.glob("*.tmp"))
    # a second run gets the next number; nothing of the first is touched
    before = (run / "best.safetensors").read_bytes()
    assert cli("train", str(recipe), "-q", cwd=tmp_path).returncode == 0
    assert (tmp_path / "runs" / "tiny" / "2" / "best.safetensors").exists()
    assert (run / "best.safetensors").read_bytes() == before


def test_cli_refuses_a_non_empty_out_folder(tmp_path, cli):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny())
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    result = cli("train", str(recipe), "--out", str(out))
    assert result.returncode == 2
    assert "already holds files" in result.stderr
    assert "data:" not in result.stderr  # refused before any decoding
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_cli_bad_recipe_value_names_file_line_and_key(tmp_path, cli):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "name: bad\nmodel:\n  layers:\n    - conv: {filters: 8, kernel: 3}\ntrain:\n  epochs: -1\n"
    )
    result = cli("train", str(recipe))
    assert result.returncode == 2
    assert f"{recipe}:6 train.epochs:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_bad_override(tmp_path, cli):
    recipe = write_recipe(tmp_path / "tiny.yaml", tiny())
    result = cli("train", str(recipe), "--set", "train.optimizer.nme=sgd", cwd=tmp_path)
    assert result.returncode == 2
    assert "--set train.optimizer.nme" in result.stderr and "did you mean 'name'" in result.stderr


@pytest.mark.slow
def test_ctrl_c_saves_and_resume_finishes(tmp_path):
    raw = tiny(epochs=400)
    recipe = write_recipe(tmp_path / "tiny.yaml", raw)
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls", "train", str(recipe), "--out", str(tmp_path / "run")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.csv").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"imgcls train --resume {tmp_path / 'run'}" in err
    assert (tmp_path / "run" / "resume.pt").exists()
    result = invoke_cli("train", "--resume", str(tmp_path / "run"), "--epochs", "3", "-q", "--json")
    assert json.loads(result.stdout)["epochs"] >= 3


def _folder_with_a_bad_file(tmp_path: Path, shapes_folder: Path) -> Path:
    import shutil

    data = tmp_path / "photos"
    shutil.copytree(shapes_folder, data)
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return data


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_cli_refuses_too_many_bad_files_and_leaves_everything_as_it_was(tmp_path, cli, shapes_folder):
    data = _folder_with_a_bad_file(tmp_path, shapes_folder)
    before = _tree(data)
    raw = tiny()
    raw["data"] = {"source": "folder", "path": str(data), "image_size": 16, "max_bad_fraction": 0.0}
    recipe = write_recipe(tmp_path / "photos.yaml", raw)
    result = cli("train", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert "broken.png" in result.stderr and "max_bad_fraction" in result.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written
    assert _tree(data) == before  # the dataset is never modified

    # allowed a few bad files, training skips it with a warning and goes on
    result = cli("train", str(recipe), "--set", "data.max_bad_fraction=0.1", "-q", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["epochs"] == 1
    assert _tree(data) == before


def test_l2_and_l1_shrink_the_weights(tmp_path):
    def conv_norm(raw: dict, name: str) -> float:
        run = train(recipe_from_dict(raw), out=tmp_path / name, log=quiet).run_dir
        return float(weights(run / "last.safetensors")["conv1.conv.weight"].norm())

    plain = conv_norm(tiny(epochs=2, optimizer={"name": "sgd", "lr": 0.05}), "plain")
    global_l2 = tiny(epochs=2, optimizer={"name": "sgd", "lr": 0.05})
    global_l2["model"]["l2"] = 1.0
    layer_l1 = tiny(epochs=2, optimizer={"name": "sgd", "lr": 0.05})
    layer_l1["model"]["layers"][0]["conv"]["l1"] = 0.5
    assert conv_norm(global_l2, "l2") < 0.5 * plain
    assert conv_norm(layer_l1, "l1") < 0.7 * plain


def test_a_layer_can_opt_out_of_global_regularisation():
    from imgcls.models.build import build_model
    from imgcls.training.schedule import regularized_weights

    raw = tiny()
    raw["model"]["l2"] = 0.01
    raw["model"]["layers"][2]["conv"].update(l1=0, l2=0)
    recipe = recipe_from_dict(raw)
    model = build_model(recipe.model, recipe.input_shape(), 3)
    terms = {tuple(w.shape): (a, b) for w, a, b in regularized_weights(model, 0.0, 0.01)}
    assert terms[(4, 3, 3, 3)] == (0.0, 0.01)  # first conv: the global value
    assert (8, 4, 3, 3) not in terms  # opted out
    assert terms[(3, 8)] == (0.0, 0.01)  # the added head


def test_data_path_with_variables_is_stored_resolved(tmp_path, shapes_folder, monkeypatch):
    monkeypatch.setenv("MYDATA", str(shapes_folder.parent))
    raw = tiny()
    raw["data"] = {"source": "folder", "path": f"$MYDATA/{shapes_folder.name}", "image_size": 16}
    run = train(recipe_from_dict(raw), out=tmp_path / "run", log=quiet).run_dir
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert saved["data"]["path"] == str(shapes_folder.resolve())


def test_resume_extends_epochs_and_refuses_switching_ema(tmp_path):
    recipe = recipe_from_dict(tiny(epochs=1))
    train(recipe, out=tmp_path / "run", log=quiet)
    longer = train(recipe_from_dict(tiny(epochs=2)), resume=tmp_path / "run", log=quiet)
    assert len(longer.history) == 2
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["train"]["epochs"] == 2
    with pytest.raises(CheckpointError, match="ema"):
        train(recipe_from_dict(tiny(epochs=3, ema=0.9)), resume=tmp_path / "run", log=quiet)


def test_ema_warms_up_so_a_short_run_is_as_accurate_as_without_it(tmp_path, monkeypatch):
    """200 steps with train.ema 0.999: without a warm-up the average stayed 82%
    (0.999^200) the random initial weights (measured: val_acc 0.625 against 1.0)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name, level in (("dark", 100), ("bright", 155)):  # told apart by mean brightness, in noise
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(100):
            pixels = np.clip(rng.normal(level, 60, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(tmp_path / "data" / name / f"{i}.png")
    raw = {
        "name": "ema",
        "data": {"source": "folder", "path": str(tmp_path / "data"), "channels": 1, "image_size": 8},
        "model": {"layers": [TINY_RECIPE["model"]["layers"][0], "global_avg_pool"]},
        # 160 training images in batches of 4: 40 steps an epoch, 200 in all
        "train": {"epochs": 5, "batch_size": 4, "optimizer": {"name": "sgd", "lr": 0.01}, "threads": 1},
    }
    monkeypatch.setattr("imgcls.training.loop._plot", lambda *args: None)  # curves.png: not the point, and slow
    plain = train(recipe_from_dict(raw), out=tmp_path / "plain", log=quiet)
    raw["train"]["ema"] = 0.999
    ema = train(recipe_from_dict(raw), out=tmp_path / "ema", log=quiet)
    assert plain.history[-1]["val_acc"] == 1.0  # the task is learnt: the comparison means something
    assert ema.history[-1]["val_acc"] >= plain.history[-1]["val_acc"]
    assert ema.best["val_acc"] >= plain.best["val_acc"]


def test_fine_tuning_starts_from_cached_pretrained_weights(tmp_path, monkeypatch):
    """pretrained: true loads torchvision's weights from the torch cache (offline
    here: a planted file), replaces the classifier, and normalises as the weights expect."""
    import os

    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights("mobilenet_v3_small").DEFAULT
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(123)
    planted = get_model("mobilenet_v3_small").state_dict()
    torch.save(planted, cache / os.path.basename(weights.url))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # any download attempt fails

    raw = tiny(optimizer={"name": "sgd", "lr": 1e-30, "momentum": 0.0})
    raw["model"] = {"arch": "mobilenet_v3_small", "pretrained": True}
    raw["data"]["image_size"] = 32
    run = train(recipe_from_dict(raw), out=tmp_path / "run", log=quiet).run_dir
    trained = load_file(str(run / "last.safetensors"))
    assert torch.equal(trained["features.0.0.weight"], planted["features.0.0.weight"])
    assert trained["classifier.3.weight"].shape == (3, 1024)  # 3 classes, not ImageNet's 1000
    from imgcls.checkpoint import read_meta

    assert read_meta(run / "last.safetensors")["preprocessing"]["mean"] == list(weights.transforms().mean)


def test_resume_refuses_another_input_size(tmp_path):
    raw = tiny()
    raw["model"]["layers"][-1] = "flatten"  # the head's size now depends on the input size
    with pytest.raises(Interrupted):
        train(recipe_from_dict(raw), out=tmp_path / "run", log=quiet, stop_after_steps=1)
    raw["data"]["image_size"] = 32
    with pytest.raises(CheckpointError, match="do not fit"):
        train(recipe_from_dict(raw), resume=tmp_path / "run", log=quiet)
