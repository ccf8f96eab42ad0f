"""train.log_to: TensorBoard and MLflow against the real libraries, no server."""

from __future__ import annotations

import copy
import csv
import sys

import pytest
from conftest import TINY_RECIPE

from imgcls.errors import UsageError
from imgcls.recipe import recipe_from_dict


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    import os

    from imgcls.training import train

    tmp = tmp_path_factory.mktemp("tracked")
    raw = copy.deepcopy(TINY_RECIPE)
    raw["train"].update(epochs=2, log_to=["csv", "tensorboard", "mlflow"])
    uri = f"file:{tmp / 'mlruns'}"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE")}
    # a file store keeps the test fast (creating MLflow's sqlite schema takes seconds)
    os.environ.update(MLFLOW_TRACKING_URI=uri, MLFLOW_ALLOW_FILE_STORE="true")
    try:
        result = train(recipe_from_dict(raw), out=tmp / "run", log=lambda m: None)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    with open(result.run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return result, uri, rows


@pytest.mark.slow  # one 2-epoch run with both trackers (imports mlflow and tensorboard)
def test_tensorboard_events_hold_each_epoch(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _, rows = tracked_run
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    assert {"loss/train", "acc/train", "loss/val", "acc/val", "lr"} <= set(events.Tags()["scalars"])
    val_acc = events.Scalars("acc/val")
    assert [e.step for e in val_acc] == [1, 2]
    assert [e.value for e in val_acc] == pytest.approx([float(r["val_acc"]) for r in rows])


@pytest.mark.slow
def test_mlflow_has_params_metrics_and_best_checkpoint(tracked_run):
    from mlflow.tracking import MlflowClient

    result, uri, rows = tracked_run
    run_id = (result.run_dir / "mlflow.json").read_text().split('"run_id": "')[1].split('"')[0]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.optimizer.lr"] == "0.001"
    assert run.data.params["model.layers.0.conv.filters"] == "4"
    assert run.data.tags["device"] == "cpu"
    history = client.get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [
        (i + 1, pytest.approx(float(r["val_loss"]))) for i, r in enumerate(rows)
    ]
    assert [a.path for a in client.list_artifacts(run_id)] == ["best.safetensors"]


def test_log_to_takes_one_name_and_rejects_unknown():
    raw = copy.deepcopy(TINY_RECIPE)
    raw["train"]["log_to"] = "tensorboard"
    assert recipe_from_dict(raw).train.log_to == ["tensorboard"]
    raw["train"]["log_to"] = ["wandb"]
    with pytest.raises(UsageError, match=r"train.log_to\[0\]: unknown value 'wandb'"):
        recipe_from_dict(raw)


@pytest.mark.parametrize("extra", ["mlflow", "tensorboard"])
def test_missing_extra_is_one_line_before_any_work(tmp_path, monkeypatch, extra):
    from imgcls.training import train

    monkeypatch.setitem(sys.modules, extra, None)  # import fails as if not installed
    raw = copy.deepcopy(TINY_RECIPE)
    raw["train"]["log_to"] = [extra]
    with pytest.raises(UsageError) as info:
        train(recipe_from_dict(raw), out=tmp_path / "run", log=lambda m: None)
    assert (
        str(info.value) == f"{extra} is not installed: pip install 'imgcls[{extra}]' (or pip install {extra})"
    )
    assert not (tmp_path / "run").exists()
