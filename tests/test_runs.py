"""imgcls runs: the table read back from run folders, and --diff."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import TINY_RECIPE

from imgcls.runs import diff_runs, list_runs

HEADER = "epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds,img_per_s\n"


def _run(folder, lr, rows, *, evaluated=None, checkpoint=None):
    folder.mkdir(parents=True)
    recipe = {**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "optimizer": {"name": "adam", "lr": lr}}}
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (folder / "metrics.csv").write_text(HEADER + "".join(",".join(map(str, r)) + "\n" for r in rows))
    (folder / "summary.json").write_text(json.dumps({"total_params": 435}))
    (folder / "run.json").write_text(json.dumps({"device": "cpu", "precision": "fp32"}))
    if evaluated is not None:
        (folder / "eval").mkdir()
        (folder / "eval" / "metrics.json").write_text(json.dumps({"accuracy": evaluated}))
    if checkpoint is not None:
        shutil.copy(checkpoint, folder / "best.safetensors")
    return folder


@pytest.fixture
def root(tmp_path, tiny_checkpoint):
    root = tmp_path / "runs"
    _run(
        root / "tiny" / "1",
        0.001,
        [(1, 0.001, 1.0, 0.5, 0.9, 0.6, 2.0, 100), (2, 0.001, 0.8, 0.7, 0.7, 0.8, 2.0, 120)],
    )
    _run(
        root / "tiny" / "2",
        0.01,
        [(1, 0.01, 1.1, 0.4, 1.2, 0.4, 1.0, 200)],
        evaluated=0.75,
        checkpoint=tiny_checkpoint,
    )
    (root / "tiny" / "3").mkdir()  # an empty folder is not a run
    return root


def test_table_reads_every_column(root):
    rows = {r["run"]: r for r in list_runs(root)}
    assert list(rows) == ["tiny/1", "tiny/2"]
    one = rows["tiny/1"]
    assert (one["arch"], one["params"], one["epochs"], one["best_epoch"]) == ("layers (4)", 435, 2, 2)
    assert (one["val_acc"], one["val_loss"], one["test_acc"]) == (0.8, 0.7, None)
    assert (one["seconds"], one["img_per_s"], one["device"], one["precision"]) == (4.0, 110.0, "cpu", "fp32")
    two = rows["tiny/2"]  # its checkpoint (epoch 0, no metrics) does not hide the csv's best
    assert (two["test_acc"], two["val_acc"], two["epochs"]) == (0.75, 0.4, 1)


def test_sort_best_first_and_unknown_column(root):
    assert [r["run"] for r in list_runs(root, "val_acc")] == ["tiny/1", "tiny/2"]
    assert [r["run"] for r in list_runs(root, "val_loss")] == ["tiny/1", "tiny/2"]
    assert [r["run"] for r in list_runs(root, "seconds")] == ["tiny/2", "tiny/1"]
    assert [r["run"] for r in list_runs(root, "test_acc")] == ["tiny/2", "tiny/1"]  # missing last
    from imgcls.errors import UsageError

    with pytest.raises(UsageError, match="did you mean 'val_acc'"):
        list_runs(root, "val_accc")


def test_diff_shows_recipe_and_metric_differences(root):
    result = diff_runs(root / "tiny" / "1", root / "tiny" / "2")
    assert result["recipe"] == [{"key": "train.optimizer.lr", "a": 0.001, "b": 0.01}]
    metrics = {m["metric"]: (m["a"], m["b"]) for m in result["metrics"]}
    assert metrics["val_acc"] == (0.8, 0.4) and metrics["test_acc"] == (None, 0.75)


def test_cli_csv_and_errors(root, cli, tmp_path):
    result = cli("runs", str(root), "--csv", "--sort", "val_acc")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("run,date,arch,params,epochs,best_epoch,val_acc,val_loss,test_acc")
    assert [line.split(",")[0] for line in lines[1:]] == ["tiny/1", "tiny/2"]
    result = cli("runs", str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "nowhere: no such folder" in result.stderr


CORRUPT = {
    "metrics.csv holding abc": ("metrics.csv", b"abc\n", "metrics.csv:1: no 'epoch' column"),
    "a value that is not a number": (
        "metrics.csv",
        HEADER.encode() + b"1,0.01,1.1,0.4,1.2,0.4,1.0,200\nabc,0.01,1.1,0.4,1.2,0.4,1.0,200\n",
        "metrics.csv:3: epoch: 'abc' is not a number",
    ),
    "non-UTF-8 metrics.csv": ("metrics.csv", HEADER.encode() + b"1,\xff\xfe,1\n", "metrics.csv:2: not UTF-8"),
    "run.json holding a list": ("run.json", b"[1,2,3]", "run.json:1: not a JSON object (a list)"),
    "summary.json cut short": ("summary.json", b'{\n"total_params": ', "summary.json:2: not valid JSON"),
    "recipe.yaml that is not YAML": ("recipe.yaml", b"name: [tiny\n", "recipe.yaml:2: not valid YAML"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_a_corrupt_run_file_is_named_and_the_other_runs_are_shown(root, cli, case):
    """One line names the file and its line; the table keeps every run and marks
    the bad one (the columns from that file empty); exit 3, a partial failure."""
    name, content, message = CORRUPT[case]
    (root / "tiny" / "2" / name).write_bytes(content)
    r = cli("runs", str(root), "--json")
    assert r.returncode == 3, r.stderr
    rows = {row["run"]: row for row in json.loads(r.stdout)}
    assert list(rows) == ["tiny/1", "tiny/2"]
    assert rows["tiny/1"]["problems"] == [] and rows["tiny/1"]["seconds"] == 4.0
    assert [p.startswith(str(root / "tiny" / "2" / name)) for p in rows["tiny/2"]["problems"]] == [True]
    assert message in rows["tiny/2"]["problems"][0]
    errors = r.stderr.strip().splitlines()
    assert len(errors) == 2 and message in errors[0], r.stderr
    assert "1 of 2 runs has files that cannot be read" in errors[1]
    assert "Traceback" not in r.stderr
    if case == "run.json holding a list":  # the table for people marks it too
        table = cli("runs", str(root))
        assert table.returncode == 3 and "1 unreadable file" in table.stdout and "tiny/1" in table.stdout
