"""The command line as a user meets it: help, version, summarize, models, data, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from imgcls import __version__

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def test_version():
    """A real `python -m imgcls` process starts and answers (every other test runs in-process)."""
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"imgcls {__version__}"


def test_help_lists_commands_without_importing_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from imgcls.cli import app;"
        "r = CliRunner().invoke(app, ['--help']); print(r.output);"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("train", "evaluate", "predict", "summarize", "export", "models", "data"):
        assert command in out
    assert out.strip().endswith("NO-TORCH")


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "summarize", "export", "models"])
def test_every_command_help_has_examples(cli, command):
    result = cli(command, "--help")
    assert result.returncode == 0
    assert "Examples" in result.stdout and f"imgcls {command}" in result.stdout


def test_summarize_seed_recipes_json(cli):
    conv = json.loads(cli("summarize", str(RECIPES / "seed-conv448.yaml"), "--json").stdout)
    assert conv["total_params"] == 448
    four = json.loads(cli("summarize", str(RECIPES / "seed-4layer.yaml"), "--json").stdout)
    assert four["total_params"] == 2_103_156


def test_summarize_arch_table(cli):
    result = cli("summarize", "vgg16")
    assert result.returncode == 0, result.stderr
    assert "138,357,544" in result.stdout
    assert "Output shape" in result.stdout


def test_summarize_input_classes_and_depth(cli):
    result = cli("summarize", "resnet18", "--input", "1x64x64", "--classes", "10", "--depth", "1", "--json")
    data = json.loads(result.stdout)
    assert data["input_shape"] == [1, 64, 64]
    assert data["num_classes"] == 10
    assert max(row["depth"] for row in data["rows"]) <= 1
    import torch
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    assert data["total_params"] == sum(p.numel() for p in model.parameters())


def test_unknown_arch_is_a_usage_error_with_a_hint(cli):
    result = cli("summarize", "resnet181")
    assert result.returncode == 2
    assert "unknown architecture 'resnet181'" in result.stderr and "resnet18" in result.stderr
    assert result.stderr.count("\n") == 1  # one line
    assert result.stdout == ""


def test_impossible_stack_names_the_layer_and_shapes(cli, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "model:\n  input_shape: 3x3x3\n  head: none\n  layers:\n    - conv: {filters: 4, kernel: 5}\n"
    )
    result = cli("summarize", str(recipe))
    assert result.returncode == 2
    assert "model.layers[0] (conv)" in result.stderr and "5x5" in result.stderr and "3x3" in result.stderr


def test_debug_shows_the_traceback(cli):
    assert "Traceback" not in cli("summarize", "nope").stderr
    assert "Traceback" in cli("--debug", "summarize", "nope").stderr


def test_duplicate_key_and_bad_shape_option(cli, tmp_path):
    recipe = tmp_path / "dup.yaml"
    recipe.write_text("name: a\nmodel: {arch: resnet18}\nname: b\n")
    result = cli("summarize", str(recipe))
    assert result.returncode == 2
    assert f"{recipe}:3 name: duplicate key (first given on line 1)" in result.stderr
    assert cli("summarize", "resnet18", "--input", "big").returncode == 2


def test_models_wildcard(cli):
    result = cli("models", "resnet*", "--json")
    names = json.loads(result.stdout)
    assert "resnet18" in names and "resnet50" in names and all(n.startswith("resnet") for n in names)
    assert "lenet5" in cli("models").stdout.split()
    nothing = cli("models", "zz*")  # no match is an empty list, not a failure
    assert nothing.returncode == 0 and nothing.stdout == ""
    assert "no architecture matches 'zz*'" in nothing.stderr
    as_json = cli("models", "zz*", "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout) == []


def test_data_shapes_writes_and_never_overwrites(cli, tmp_path):
    out = tmp_path / "shapes"
    result = cli("data", "shapes", str(out), "--per-class", "3", "--size", "16")
    assert result.returncode == 0, result.stderr
    pngs = sorted(out.rglob("*.png"))
    assert len(pngs) == 6 * 3
    again = cli("data", "shapes", str(out), "--per-class", "3")
    assert again.returncode == 2
    assert len(sorted(out.rglob("*.png"))) == 18


@pytest.mark.slow
def test_quickstart_reaches_95_percent_and_beats_the_mlp(cli, quickstart_run, tmp_path):
    """The README's main job, end to end: the CNN passes 95%, the MLP visibly does not."""
    cnn_run, cnn = quickstart_run
    cnn_acc = cnn["val_acc"]
    assert cnn_acc >= 0.95
    mlp = cli("train", str(RECIPES / "mlp.yaml"), "--out", str(tmp_path / "mlp"), "--json", "-q")
    assert mlp.returncode == 0, mlp.stderr
    assert json.loads(mlp.stdout)["val_acc"] < cnn_acc - 0.3
    # evaluate on the run's own validation split agrees with training's number
    ev = cli("evaluate", str(cnn_run), "--json")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(cnn_acc, abs=1e-6)


def test_in_process_runs_leave_no_state_behind(cli, tmp_path):
    """The `cli` fixture undoes what a command changes in this interpreter, as a process exit would."""
    import os
    import signal
    import warnings

    import torch
    import yaml
    from conftest import TINY_RECIPE

    import imgcls.cli

    recipe = tmp_path / "tiny.yaml"
    raw = {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "threads": 1, "deterministic": True}}
    recipe.write_text(yaml.safe_dump(raw))

    def process_state() -> tuple:
        return (
            torch.get_num_threads(),
            torch.are_deterministic_algorithms_enabled(),
            signal.getsignal(signal.SIGINT),
            os.getcwd(),
            dict(os.environ),
            list(warnings.filters),
            dict(imgcls.cli._state),
        )

    before = process_state()
    assert before[0] > 1 or os.cpu_count() == 1  # threads: 1 is a change to undo
    trained = cli("--debug", "train", str(recipe), "-q", cwd=tmp_path, env={"IMGCLS_TEST_VAR": "1"})
    assert trained.returncode == 0, trained.stderr
    assert (tmp_path / "runs").is_dir()  # it ran where it was told
    failed = cli("--debug", "summarize", "nope", cwd=tmp_path)
    assert failed.returncode != 0 and "Traceback" in failed.stderr  # an escaping error reads as in a process
    assert process_state() == before


def test_a_closed_pipe_stops_quietly():
    """`imgcls ... | head`: the reader goes away; a real process exits 1 with no traceback on stderr."""
    import os

    proc = subprocess.Popen(
        [sys.executable, "-m", "imgcls", "--help"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "COLUMNS": "80"},
    )
    proc.stdout.close()  # before the child writes anything
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert err == ""
