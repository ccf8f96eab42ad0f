"""Training never saves a poisoned checkpoint, never leaves litter, and its
files are bit-identical when the recipe says deterministic."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE
from safetensors.torch import load_file

import imgcls.training.loop as train_module
from imgcls.checkpoint import read_meta
from imgcls.errors import DataError, Diverged, UsageError
from imgcls.recipe import recipe_from_dict
from imgcls.training import train


def tiny(**train_overrides) -> dict:
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["train"].update(train_overrides)
    return raw


def quiet(_: str) -> None:
    pass


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_file(str(path)).values() if t.is_floating_point())


# --------------------------------------------------------------------------- two writers


def test_a_run_being_trained_refuses_a_second_resume_and_calibrate_until_it_ends(tmp_path, cli):
    """`imgcls train --resume RUN` (or `imgcls calibrate RUN`) while another process
    trains RUN used to go ahead: two trainings interleaved their checkpoints in one
    folder, and the second one's repair_pair could roll back the first one's save.
    The folder is held from its start to the end of train; a second writer gets one
    line and exit 2 and changes nothing; once train ends, both work."""
    out = tmp_path / "run"
    seen: dict = {}

    def second_writers(row: dict) -> None:
        if row["epoch"] == 1:  # the run folder has its first checkpoint pair
            files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
            seen["resume"] = cli("train", "--resume", str(out))
            seen["calibrate"] = cli("calibrate", str(out))
            seen["unchanged"] = files == {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    result = train(recipe_from_dict(tiny(epochs=2)), out=out, log=quiet, on_epoch_end=second_writers)
    held = "another imgcls process is writing this run folder (training, resuming, calibrating or cross-validating it)"
    assert seen["resume"].returncode == 2 and seen["calibrate"].returncode == 2
    assert seen["resume"].stderr.strip().splitlines() == [
        f"error: {out}: {held}; resume it once that has finished"
    ]
    assert seen["calibrate"].stderr.strip() == f"error: {out}: {held}; calibrate it once that has finished"
    assert seen["unchanged"]
    assert len(result.history) == 2  # the first went on to its end
    after = cli("calibrate", str(out))
    assert after.returncode == 0, after.stderr


# --------------------------------------------------------------------------- NaN / Inf


def test_a_diverging_first_epoch_stops_with_epoch_step_and_hint_and_leaves_nothing(tmp_path):
    """sgd with lr 1e6 used to train to the end with loss nan and save a NaN best."""
    recipe = recipe_from_dict(tiny(epochs=3, batch_size=4, optimizer={"name": "sgd", "lr": 1e30}))
    with pytest.raises(Diverged) as info:
        train(recipe, out=tmp_path / "run", log=quiet)
    message = str(info.value)
    assert "\n" not in message
    assert "at epoch 1, step " in message
    assert "train.optimizer.lr" in message and "train.grad_clip" in message and "fp32" in message
    assert info.value.exit_code == 1
    assert not (tmp_path / "run").exists()  # never started: no folder


def test_divergence_after_good_epochs_keeps_the_good_checkpoints(tmp_path, monkeypatch):
    """The epoch-1 checkpoints stay as they were; nothing non-finite is written or picked as best."""
    real_lr_at = train_module.lr_at

    def lr_at(step, total, steps_per_epoch, base_lr, spec):  # sane for epoch 1, absurd after
        return real_lr_at(step, total, steps_per_epoch, base_lr, spec) * (
            1.0 if step < steps_per_epoch else 1e30
        )

    monkeypatch.setattr(train_module, "lr_at", lr_at)
    seen = []
    recipe = recipe_from_dict(tiny(epochs=4, optimizer={"name": "sgd", "lr": 0.05}))
    with pytest.raises(Diverged, match=r"at epoch 2, step \d+/\d+"):
        train(recipe, out=tmp_path / "run", log=quiet, on_epoch_end=seen.append)
    run = tmp_path / "run"
    assert [row["epoch"] for row in seen] == [1]
    for name in ("best.safetensors", "last.safetensors"):
        assert all_finite(run / name), name
        assert read_meta(run / name)["epoch"] == 1
    assert [r["epoch"] for r in csv.DictReader((run / "metrics.csv").open())] == ["1"]
    assert not list(run.glob(".*.tmp"))


def test_the_cli_exits_1_with_one_line_on_divergence(tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny(optimizer={"name": "sgd", "lr": 1e6})))
    result = cli("train", str(recipe), "-q", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "NaN or infinite" in result.stderr and "epoch 1" in result.stderr
    assert not (tmp_path / "runs" / "r" / "1").exists()


# --------------------------------------------------------------------------- on_epoch_end


def test_on_epoch_end_sees_each_row_after_its_files_and_its_exceptions_propagate(tmp_path):
    class Prune(Exception):
        pass

    rows = []

    def on_epoch_end(row: dict) -> None:
        run = tmp_path / "run"
        written = list(csv.DictReader((run / "metrics.csv").open()))
        assert len(written) == row["epoch"]  # metrics.csv already has this epoch
        assert read_meta(run / "last.safetensors")["epoch"] == row["epoch"]
        rows.append(row)
        if row["epoch"] == 2:
            raise Prune

    with pytest.raises(Prune):
        train(recipe_from_dict(tiny(epochs=4)), out=tmp_path / "run", log=quiet, on_epoch_end=on_epoch_end)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr"} <= set(rows[0])


# --------------------------------------------------------------------------- bit-identical files


def test_deterministic_runs_write_byte_identical_best_and_last(tmp_path):
    recipe = recipe_from_dict(tiny(epochs=2, deterministic=True))
    a = train(recipe, out=tmp_path / "a", log=quiet).run_dir
    b = train(recipe, out=tmp_path / "b", log=quiet).run_dir
    for name in ("best.safetensors", "last.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert "seconds" not in read_meta(a / "best.safetensors")["metrics"]
    assert "img_per_s" in (a / "metrics.csv").read_text()  # timings live here instead


# --------------------------------------------------------------------------- run folders


def bad_data(tmp_path: Path) -> dict:
    raw = tiny()
    raw["data"] = {"source": "folder", "path": str(tmp_path / "nothing-here"), "image_size": 16}
    return raw


def test_a_data_error_leaves_no_run_folder(tmp_path):
    out = tmp_path / "new"
    with pytest.raises(DataError):
        train(recipe_from_dict(bad_data(tmp_path)), out=out, log=quiet)
    assert not out.exists()
    mine = tmp_path / "mine"  # an empty folder the user made stays, empty
    mine.mkdir()
    with pytest.raises(DataError):
        train(recipe_from_dict(bad_data(tmp_path)), out=mine, log=quiet)
    assert mine.is_dir() and not list(mine.iterdir())


def test_an_interrupt_before_the_first_step_leaves_no_run_folder(tmp_path, monkeypatch):
    """A Ctrl-C (or any failure) between making the folder and the first checkpoint."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    raw = tiny()
    raw["train"]["out"] = str(tmp_path / "runs")
    with pytest.raises(KeyboardInterrupt):
        train(recipe_from_dict(raw), log=quiet)
    assert not list((tmp_path / "runs").rglob("*.*"))  # no files
    assert not (tmp_path / "runs" / "tiny" / "1").exists()


def test_a_failure_after_the_folder_is_made_and_before_training_leaves_nothing(tmp_path, monkeypatch):
    """The start's last steps (the restart record, the broadcast, run.json, the
    progress bar) used to run outside the cleanup: a failure or Ctrl-C there
    left runs/tiny/1 behind with recipe.yaml and the summary in it."""
    from imgcls import distributed
    from imgcls.training import outputs as checkpoint

    real_write = checkpoint.write_text_atomic

    def unwritable_run_json(path, text):
        if Path(path).name == "run.json":
            raise OSError(28, "No space left on device")
        real_write(path, text)

    def broken(self, value):
        raise RuntimeError("Connection closed by peer")

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    raw = tiny()
    raw["train"]["out"] = str(tmp_path / "runs")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # a restart record is written too
    for target, name, fake, error in (
        (checkpoint, "write_text_atomic", unwritable_run_json, OSError),
        (distributed.Group, "broadcast", broken, RuntimeError),
        (train_module._Progress, "__init__", ctrl_c, KeyboardInterrupt),
    ):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, fake)
            with pytest.raises(error):
                train(recipe_from_dict(raw), log=quiet)
        assert not [p for p in (tmp_path / "runs").rglob("*") if p.name != "tiny"], name


def test_a_ctrl_c_after_the_last_checkpoint_skips_the_report_and_exits_0(tmp_path, monkeypatch, cli):
    """The run is done once its last checkpoint is written: a Ctrl-C in the
    plots or the report used to turn it into exit 130."""
    import yaml

    import imgcls.report

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny()))
    monkeypatch.setattr(imgcls.report, "write_report", ctrl_c)
    result = cli("train", str(recipe), "--out", str(tmp_path / "run"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["run_dir"] == str(tmp_path / "run")
    skipped = [line for line in result.stderr.splitlines() if "Ctrl-C" in line]
    assert skipped == [
        "Ctrl-C: the run had finished and is saved; its curves and report were skipped "
        f"(imgcls report {tmp_path / 'run'} writes the report)"
    ]
    assert (tmp_path / "run" / "best.safetensors").is_file() and (tmp_path / "run" / "resume.pt").is_file()
    assert not (tmp_path / "run" / "report.html").exists()
    monkeypatch.setattr(train_module, "_plot", ctrl_c)  # in the curves: the same, through the library
    said = []
    result = train(recipe_from_dict(tiny()), out=tmp_path / "plot", log=said.append)
    assert result.best_epoch == 1 and sum("Ctrl-C: the run had finished" in line for line in said) == 1


@pytest.mark.parametrize("case", ["a file", "inside a file", "missing parent"])
def test_bad_out_is_a_usage_error_before_any_work(tmp_path, case):
    (tmp_path / "file").write_text("x")
    out = {
        "a file": tmp_path / "file",
        "inside a file": tmp_path / "file" / "run",
        "missing parent": tmp_path / "no" / "such" / "run",
    }[case]
    with pytest.raises(UsageError) as info:
        train(recipe_from_dict(tiny()), out=out, log=quiet)
    assert str(out) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "no").exists()


def test_cli_bad_out_exits_2_with_one_line_and_debug_keeps_the_code(tmp_path, cli):
    import os

    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps(tiny()))
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        for out in (tmp_path / "r.yaml", locked / "run"):
            if out.parent == locked and os.access(locked, os.W_OK):
                continue  # root writes anywhere: no read-only folder to test with
            result = cli("train", str(recipe), "--out", str(out))
            assert result.returncode == 2, result.stderr
            assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
        result = cli("--debug", "train", str(recipe), "--out", str(tmp_path / "r.yaml"))
        assert result.returncode == 2  # --debug shows more, the exit code stays
        assert "Traceback" in result.stderr and "error:" in result.stderr
    finally:
        os.chmod(locked, 0o700)
