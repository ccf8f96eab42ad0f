"""imgcls tune: the space file is checked like a recipe; a small search end to end."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RECIPE

from imgcls.errors import RecipeError
from imgcls.recipe import recipe_from_dict, recipe_to_dict
from imgcls.tune import load_space


def _raw() -> dict:
    return recipe_to_dict(recipe_from_dict(TINY_RECIPE))


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_space_reads_every_distribution(tmp_path):
    space = _space(
        tmp_path,
        "train.optimizer.lr: {loguniform: [1e-4, 1e-1]}\n"
        "data.augment.mixup: {uniform: [0, 0.4]}\n"
        "train.batch_size: {int: [4, 16]}\n"
        "model.layers[0].conv.filters: {choice: [4, 8]}\n"
        "train.optimizer.name: {choice: [adam, sgd]}\n",
    )
    params = load_space(space, _raw())
    assert [(p.key, p.kind, p.values, p.line) for p in params] == [
        ("train.optimizer.lr", "loguniform", (1e-4, 1e-1), 1),
        ("data.augment.mixup", "uniform", (0, 0.4), 2),
        ("train.batch_size", "int", (4, 16), 3),
        ("model.layers[0].conv.filters", "choice", (4, 8), 4),
        ("train.optimizer.name", "choice", ("adam", "sgd"), 5),
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "train.epochs: {int: [1, 3]}\ntrain.optimizer.lrr: {loguniform: [1e-4, 1e-1]}\n",
            "space.yaml:2 train.optimizer.lrr: unknown key 'lrr'; did you mean 'lr'?",
        ),
        (
            "train.optimizer.lr: {logunifrom: [1e-4, 1e-1]}\n",
            "space.yaml:1 train.optimizer.lr: unknown distribution 'logunifrom'; did you mean 'loguniform'?",
        ),
        (
            "train.optimizer.lr: {uniform: [0.1, 0.01]}\n",
            "space.yaml:1 train.optimizer.lr: low (0.1) must be below high (0.01)",
        ),
        (
            "train.optimizer.lr: {loguniform: [0, 0.1]}\n",
            "space.yaml:1 train.optimizer.lr: loguniform needs low > 0",
        ),
        ("train.batch_size: {int: [1.5, 8]}\n", "space.yaml:1 train.batch_size: int takes whole numbers"),
        (
            "\n\ndata.augment.random_erasing: {uniform: [0, 1.5]}\n",
            "space.yaml:3 data.augment.random_erasing: Input should be less than or equal to 1",
        ),
        ("model.layers[9].conv.filters: {choice: [4, 8]}\n", "space.yaml:1 model.layers[9]"),
        (
            "train.optimizer.name: {choice: [adam, sgdd]}\n",
            "space.yaml:1 train.optimizer.name: unknown value 'sgdd'; did you mean 'sgd'?",
        ),
        ("train.epochs: 3\n", "space.yaml:1 train.epochs: give one distribution"),
    ],
)
def test_space_errors_name_the_line(tmp_path, text, expected):
    with pytest.raises(RecipeError) as info:
        load_space(_space(tmp_path, text), _raw())
    message = str(info.value)
    assert message.startswith(str(tmp_path / "space.yaml")), message
    assert expected in message, message


def test_tune_cli_reports_a_bad_space_with_exit_2(tmp_path, cli):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    (tmp_path / "tiny.space.yaml").write_text("train.optimizer.lrr: {loguniform: [1e-4, 1e-1]}\n")
    result = cli("tune", str(recipe), "--trials", "2", cwd=tmp_path)
    assert result.returncode == 2
    assert "tiny.space.yaml:1 train.optimizer.lrr: unknown key 'lrr'" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_search_prunes_continues_and_best_yaml_retrains_to_its_value(tmp_path, monkeypatch):
    from imgcls.recipe import load_recipe
    from imgcls.training import train
    from imgcls.tune import tune

    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["shapes"]["per_class"] = 10
    raw["train"].update(epochs=3, deterministic=True, threads=1)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    (tmp_path / "tiny.space.yaml").write_text("train.optimizer.lr: {loguniform: [1e-4, 3e-1]}\n")
    monkeypatch.chdir(tmp_path)

    # stop after 2 trials (as Ctrl-C would), then rerun: the study continues to 4
    first = tune(recipe, trials=4, startup_trials=1, log=lambda m: None, stop_after_trials=2)
    assert first.interrupted and len(first.trials) == 2
    result = tune(recipe, trials=4, startup_trials=1, log=lambda m: None)
    assert not result.interrupted
    assert sorted(t.number for t in result.trials) == [0, 1, 2, 3]
    assert all(t.state in ("complete", "pruned") for t in result.trials)
    folder = tmp_path / "runs" / "tiny-tune"
    assert result.folder == Path("runs/tiny-tune") and (folder / "study.db").exists()
    for t in result.trials:  # every trial a normal run folder
        assert (tmp_path / t.run_dir / "metrics.csv").exists() and (
            tmp_path / t.run_dir / "best.safetensors"
        ).exists()
        assert t.epochs == (
            3
            if t.state == "complete"
            else len(list(csv.DictReader(open(tmp_path / t.run_dir / "metrics.csv"))))
        )
    values = [t.value for t in result.trials if t.state == "complete"]
    assert values == sorted(values, reverse=True) and result.best.value == values[0]
    with open(folder / "trials.csv") as f:
        assert [int(r["trial"]) for r in csv.DictReader(f)] == [t.number for t in result.trials]

    best = load_recipe(folder / "best.yaml")  # a plain recipe
    assert best.train.optimizer.lr == pytest.approx(result.best.params["train.optimizer.lr"])
    again = train(best, out=tmp_path / "retrain", log=lambda m: None)
    assert again.best["val_acc"] == result.best.value


def _tiny_study(tmp_path: Path, monkeypatch, **train) -> Path:
    raw = copy.deepcopy(TINY_RECIPE)
    raw["train"].update(deterministic=True, threads=1, **train)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    (tmp_path / "tiny.space.yaml").write_text("train.optimizer.lr: {loguniform: [1e-4, 3e-1]}\n")
    monkeypatch.chdir(tmp_path)
    return recipe


# tune --jobs 2 (trials in worker processes, each equal to its recipe trained alone,
# exactly --trials finished): test_interactions.py::test_jobs_2_runs_each_trial_as_a_standalone_train
# and test_tune_jobs_finishes_exactly_the_trials_asked, on one launch shared with its tune runs.


def test_the_value_is_the_metric_of_the_epoch_whose_checkpoint_is_kept(tmp_path, monkeypatch):
    from imgcls.checkpoint import read_meta
    from imgcls.tune import tune

    # best.safetensors follows val_acc (the default monitor); the value is --metric train_loss at that epoch
    recipe = _tiny_study(tmp_path, monkeypatch, epochs=4)
    result = tune(recipe, trials=1, metric="train_loss", pruner="none", log=lambda m: None)
    (trial,) = result.trials
    kept = read_meta(Path(trial.run_dir) / "best.safetensors")
    assert trial.value == kept["metrics"]["train_loss"]
    with open(Path(trial.run_dir) / "metrics.csv") as f:
        losses = [float(r["train_loss"]) for r in csv.DictReader(f)]
    assert kept["epoch"] < 4 and min(losses) < trial.value  # the case where the two differ


def test_the_same_command_tries_the_same_values_and_seed_changes_them(tmp_path, monkeypatch, cli):
    from imgcls.tune import tune

    recipe = _tiny_study(tmp_path, monkeypatch)
    quiet = lambda m: None  # noqa: E731
    a = tune(recipe, trials=1, study="a", log=quiet).trials[0].params  # seed: the recipe's train.seed
    b = tune(recipe, trials=1, study="b", log=quiet).trials[0].params
    assert a == b
    r = cli("tune", str(recipe), "--trials", "1", "--study", "c", "--seed", "7", "--json")
    assert r.returncode == 0, r.stderr
    import json

    assert json.loads(r.stdout)["trials"][0]["params"] != a


@pytest.mark.parametrize("study", ["../escape_study", "a/b", ".hidden", "/tmp/abs"])
def test_a_study_name_that_leaves_the_runs_folder_is_refused(tmp_path, monkeypatch, cli, study):
    recipe = _tiny_study(tmp_path, monkeypatch)
    r = cli("tune", str(recipe), "--trials", "1", "--study", study)
    assert r.returncode == 2 and "--study" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.space.yaml", "tiny.yaml"]


def test_a_failed_tune_leaves_no_study_folder(tmp_path, monkeypatch, cli):
    recipe = _tiny_study(tmp_path, monkeypatch)
    r = cli("tune", str(recipe), "--trials", "1", "--storage", "bogus://x")
    assert r.returncode == 2 and "--storage bogus://x" in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.space.yaml", "tiny.yaml"]
