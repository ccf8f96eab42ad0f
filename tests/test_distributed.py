"""Several processes: `imgcls train --nproc N` through torch's elastic launcher.

The multi-process launches cost several seconds of imports each, so module
fixtures start them once and the assertions share them; the launcher runs
in-process (its workers are real processes) except where the launcher's own
process is the point (Ctrl-C)."""

from __future__ import annotations

import copy
import csv
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE, invoke_cli

pytestmark = pytest.mark.filterwarnings("ignore")


def _recipe_dict(out: Path, **train) -> dict:
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["data"]["shapes"]["per_class"] = 16  # 39 train / 9 val images
    recipe["train"] = {
        "epochs": 2,
        "batch_size": 8,
        "deterministic": True,
        "schedule": "constant",
        "out": str(out),
        **train,
    }
    return recipe


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "last.safetensors"))


def _rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _train(recipe: dict, **kwargs):
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    return train(recipe_from_dict(recipe), log=lambda m: None, **kwargs)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """Three 2-process runs, shared by the assertions below:

    - `stopped`: a real `imgcls train --nproc 2` process, Ctrl-C'd (SIGINT to
      its process group, as a terminal sends it) after epoch 1 of 60, then
      resumed in 2 processes up to the epoch after the one it stopped in,
      with rank 1 killed (SIGKILL) in that last epoch and `--max-restarts 1`;
    - `whole`: an uninterrupted 2-process run of as many epochs;
    - `reference`: the same recipe in one process.
    The resumed and whole launchers run in-process (their workers are real
    processes): the launcher's own process is the point only for Ctrl-C.
    The backbone is frozen for epoch 1 (`unfreeze_at: 1`): every run crosses
    the switch, and every resume lands past it."""
    tmp = tmp_path_factory.mktemp("dist")
    recipe = _recipe_dict(tmp / "runs", epochs=60, unfreeze_at=1)
    recipe_file = tmp / "tiny.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    stopped = tmp / "stopped"
    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls", "train", str(recipe_file), "--nproc", "2", "--out", str(stopped)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as in a terminal
    )
    head = []
    try:
        for line in proc.stderr:  # rank 0's log, line by line as it trains
            head.append(line)
            if line.startswith("epoch 1/60"):
                os.killpg(proc.pid, signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = "".join(head) + err
    assert proc.returncode == 130, err
    stop = re.search(r"interrupted in epoch (\d+) at step (\d)/4; state saved", err)
    assert stop is not None, err
    epochs = int(stop[1]) + 1  # the stopped epoch's rest, and one more
    saved = torch.load(stopped / "resume.pt", weights_only=True)["state"]
    restarted = invoke_cli(
        "train",
        str(recipe_file),
        "--resume",
        str(stopped),
        "--nproc",
        "2",
        "--max-restarts",
        "1",
        "--epochs",
        str(epochs),
        env={"IMGCLS_KILL_AT": f"1:{(epochs - 1) * 4 + 1}"},  # rank 1 dies at step 2 of the last epoch
    )
    whole = invoke_cli(
        "train",
        str(recipe_file),
        "--nproc",
        "2",
        "--epochs",
        str(epochs),
        "--out",
        str(tmp / "whole"),
        "--json",
    )
    assert whole.returncode == 0, whole.stderr
    recipe["train"]["epochs"] = epochs
    reference = _train(recipe, out=tmp / "reference")
    return {
        "tmp": tmp,
        "recipe": recipe,
        "epochs": epochs,
        "stopped": stopped,
        "stop_stdout": out,
        "stop_stderr": err,
        "saved": saved,
        "restarted": restarted,
        "whole": tmp / "whole",
        "whole_result": whole,
        "reference": reference,
    }


@pytest.mark.slow
def test_ctrl_c_on_the_launcher_stops_every_rank_and_saves_once(dist):
    err = dist["stop_stderr"]
    assert "Traceback" not in err, err
    assert dist["stop_stdout"] == ""
    # rank 0 alone speaks: one notice, one final line naming the saved state
    assert err.count("stopping after this step") == 1, err
    assert [line for line in err.splitlines() if "interrupted" in line] == [err.strip().splitlines()[-1]]
    assert err.strip().endswith(f"Resume with: imgcls train --resume {dist['stopped']}")
    saved = dist["saved"]  # the state saved at the stop (the resume overwrote it since)
    assert saved["epoch"] == dist["epochs"] - 2 and 1 <= saved["step"] <= 4


@pytest.mark.slow
def test_a_killed_rank_restarts_the_group_which_ends_equal_to_an_uninterrupted_run(dist):
    restarted, run = dist["restarted"], dist["stopped"]
    assert restarted.returncode == 0, restarted.stderr
    assert f"restart 1: resuming {run} from its last checkpoint" in restarted.stderr
    # deterministic mode: stopped by Ctrl-C, resumed, a rank killed and the
    # group restarted, and still bit for bit the run that never stopped
    resumed, whole = _weights(run), _weights(dist["whole"])
    assert resumed.keys() == whole.keys()
    assert all(torch.equal(resumed[key], whole[key]) for key in whole)
    rows, ref = _rows(run), _rows(dist["whole"])
    assert [r["epoch"] for r in rows] == [str(e) for e in range(1, dist["epochs"] + 1)]
    for row, want in zip(rows, ref, strict=True):
        assert (row["val_loss"], row["val_acc"], row["train_acc"]) == (
            want["val_loss"],
            want["val_acc"],
            want["train_acc"],
        )
        # the stopped epoch's loss sum was carried across the stop: added in another order
        assert float(row["train_loss"]) == pytest.approx(float(want["train_loss"]), rel=1e-12)


@pytest.mark.slow
def test_two_ranks_follow_one_rank_and_only_rank_0_writes(dist):
    result, run, tmp = dist["whole_result"], dist["whole"], dist["tmp"]
    # rank 0 alone reports: one JSON line, each epoch logged once
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["run_dir"] == str(run)
    assert result.stderr.count(f"epoch {dist['epochs']}/{dist['epochs']}") == 1
    assert "2 processes, 4 images each per batch" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == [
        "best.safetensors",
        "curves.png",
        "last.safetensors",
        "metrics.csv",
        "recipe.yaml",
        "report.html",
        "resume.pt",
        "run.json",
        "summary.json",
        "summary.txt",
    ]
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert not (tmp / "runs").exists()  # no other run folder, no restart record
    # no BatchNorm: 2 ranks averaging gradients follow the one-process run (up
    # to summation order); a step skipped or repeated would move the weights
    # by ~lr * grad >> 1e-6
    ref = dist["reference"]
    one, two = _weights(ref.run_dir), _weights(run)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    last = _rows(run)[-1]
    assert abs(float(last["val_acc"]) - ref.history[-1]["val_acc"]) <= 1 / 9 + 1e-9
    assert float(last["train_loss"]) == pytest.approx(ref.history[-1]["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_two_ranks_follow_one_rank_across_unfreeze_at_and_a_resume_past_it(dist):
    """The DDP wrapper is rebuilt when the backbone unfreezes (and a resume past
    the switch builds it with everything trainable): otherwise the unfrozen
    weights step on each rank's own gradients (seen: off by 5e-3 after one epoch)."""
    whole, stopped, ref = dist["whole"], dist["stopped"], dist["reference"].run_dir
    assert "frozen (backbone)" in dist["whole_result"].stderr
    assert dist["saved"]["epoch"] >= 1  # the Ctrl-C'd run was resumed past the switch
    one = _weights(ref)
    for run in (whole, stopped):  # across the switch; resumed past it (and restarted)
        two = _weights(run)
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_sharded_validation_equals_one_process_on_the_same_weights(dist):
    """The 2-rank run's last validation numbers, recomputed in one process on its weights."""
    from imgcls.data import prepare_data
    from imgcls.forward import tensor_logits
    from imgcls.models.build import build_model
    from imgcls.recipe import recipe_from_dict

    run = dist["whole"]
    recipe = recipe_from_dict(dist["recipe"])
    data = prepare_data(recipe.data, ".", None)
    model = build_model(recipe.model, recipe.input_shape(), 3)
    model.load_state_dict(_weights(run))
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for rows, logits in tensor_logits(model, data.val.x, data.mean, data.std, batch_size=4):
            y = data.val.y[rows]
            loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
    row = _rows(run)[-1]
    assert float(row["val_acc"]) == correct / len(data.val.y)
    assert float(row["val_loss"]) == pytest.approx(loss / len(data.val.y), rel=1e-6)


@pytest.mark.slow
def test_two_ranks_fit_the_temperature_of_one_process(dist):
    """Rank 0 fits the temperature at the end on the whole validation split
    (imgcls.calibration): the 2-rank run's equals the one-process run's (their
    weights agree to 1e-5), and the Ctrl-C'd, resumed and restarted run's is
    the uninterrupted 2-rank run's exactly (bit-identical weights)."""
    from imgcls.checkpoint import BEST, LAST, read_meta

    def stored(run: Path) -> dict:
        best, last = (read_meta(run / name)["calibration"] for name in (BEST, LAST))
        assert best == last
        return best

    one, two, resumed = stored(dist["reference"].run_dir), stored(dist["whole"]), stored(dist["stopped"])
    assert one == dist["reference"].calibration
    assert one["fitted_on"] == "the run's validation split (9 images)"
    assert two["temperature"] == pytest.approx(one["temperature"], rel=1e-3)
    assert two["ece_after"] == pytest.approx(one["ece_after"], abs=1e-3)
    assert resumed == two
    assert json.loads(dist["whole_result"].stdout)["calibration"] == two  # rank 0 reports it


@pytest.mark.slow
def test_resume_across_world_sizes(dist):
    """2 processes -> 1 (on a copy of the whole run: other tests read it), and
    2 -> 2 mid-epoch (the Ctrl-C'd run, above): the state is the global
    batch's step, whatever the number of processes."""
    tmp, recipe = dist["tmp"], dist["recipe"]
    copy_of = shutil.copytree(dist["whole"], tmp / "two_then_one")
    longer = {**recipe, "train": {**recipe["train"], "epochs": dist["epochs"] + 1}}
    _train(longer, resume=copy_of)
    reference = _train(longer, out=tmp / "reference_longer")
    one, two = _weights(reference.run_dir), _weights(copy_of)
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6)
    assert [r["epoch"] for r in _rows(copy_of)] == [str(e) for e in range(1, dist["epochs"] + 2)]


def test_gradient_accumulation_gives_the_larger_batch_weights(tmp_path):
    big = _train(_recipe_dict(tmp_path, batch_size=8, epochs=1), out=tmp_path / "big")
    accumulated = _train(
        _recipe_dict(tmp_path, batch_size=4, gradient_accumulation=2, epochs=1), out=tmp_path / "acc"
    )
    a, b = _weights(big.run_dir), _weights(accumulated.run_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    assert json.loads((accumulated.run_dir / "run.json").read_text())["gradient_accumulation"] == 2


def test_a_restarted_group_finds_its_run_folder(tmp_path, monkeypatch):
    from imgcls import distributed
    from imgcls.recipe import recipe_from_dict

    recipe = recipe_from_dict(_recipe_dict(tmp_path / "runs"))
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job/7")
    run_dir = tmp_path / "runs" / "tiny" / "1"
    run_dir.mkdir(parents=True)
    distributed.record_run_dir(recipe, run_dir)
    (run_dir / "recipe.yaml").write_text("x")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert distributed.restart_target(distributed.SINGLE, recipe, None, None, print) == (None, None)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    # killed before its first checkpoint: the start's files go, the folder is used again
    assert distributed.restart_target(distributed.SINGLE, recipe, None, None, print) == (run_dir, None)
    assert not any(run_dir.iterdir())
    (run_dir / "last.safetensors").write_text("x")
    assert distributed.restart_target(distributed.SINGLE, recipe, None, None, print) == (None, run_dir)
    distributed.forget_run_dir(recipe)
    assert not (tmp_path / "runs" / "tiny" / distributed.RECORDS).exists()


def test_bad_launches_fail_in_one_line(monkeypatch):
    from imgcls import distributed
    from imgcls.errors import RecipeError, UsageError
    from imgcls.recipe import recipe_from_dict

    recipe = recipe_from_dict(_recipe_dict(Path("runs")))
    with pytest.raises(UsageError, match="--nproc 0"):
        distributed.check_launch(0, recipe)
    with pytest.raises(RecipeError, match="batch_size 8 does not divide among 3 processes"):
        distributed.check_launch(3, recipe)
    cuda = recipe_from_dict(_recipe_dict(Path("runs"), device="cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match="needs 2 GPUs; this machine has 1"):
        distributed.check_launch(2, cuda)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(UsageError, match=f"--port {port}: already in use"):
            distributed.launch(["train", "x.yaml"], 2, port=port)


def test_a_rank_that_cannot_reach_the_rendezvous_fails_in_time(monkeypatch):
    from imgcls import distributed
    from imgcls.errors import ImgclsError

    port = distributed.free_port()  # nobody listens there
    for key, value in {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        distributed.TIMEOUT_ENV: "1",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ImgclsError, match=f"rank 1 could not join the group at 127.0.0.1:{port}"):
        distributed.join("cpu")  # within the 1 s timeout, not a hang


def test_validation_rows_split_without_overlap():
    from imgcls.distributed import Group

    for n in (0, 1, 9, 10):
        shares = [Group(rank=r, world=4).split(n) for r in range(4)]
        assert [i for share in shares for i in share] == list(range(n))


def test_nproc_zero_is_a_usage_error(cli):
    result = cli("train", "x.yaml", "--nproc", "0")
    assert result.returncode == 2


def test_more_cpu_processes_than_cores_are_warned_about(tmp_path, monkeypatch, cli):
    from imgcls import distributed

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(_recipe_dict(tmp_path / "runs", device="cpu")))
    started = []
    monkeypatch.setattr(distributed, "launch", lambda args, nproc, **kw: started.append(nproc) or 0)
    monkeypatch.setattr(distributed, "usable_cpus", lambda: 2)
    warned = cli("train", str(recipe), "--nproc", "4")
    fits = cli("train", str(recipe), "--nproc", "2")
    assert (warned.returncode, fits.returncode, started) == (0, 0, [4, 2]), warned.stderr + fits.stderr
    assert warned.stderr.splitlines() == [
        "warning: --nproc 4 is more than the 2 CPU cores this machine gives the run; "
        "the processes will take turns (use --nproc 2 or fewer)"
    ]
    assert fits.stderr == ""
