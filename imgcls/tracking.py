"""Experiment trackers a run reports to, per ``train.log_to``.

``csv`` is the run folder's own metrics.csv, written by train whatever this
list says (resume, ``imgcls runs`` and reports read it). ``tensorboard``
writes event files into ``<run>/tensorboard/`` (``tensorboard --logdir runs``
shows every run). ``mlflow`` logs the recipe as params, each epoch's metrics
and the best checkpoint to MLflow's tracking URI: ``MLFLOW_TRACKING_URI``
when set, else MLflow's own default (``sqlite:///mlflow.db`` in the current
folder, artifacts in ``./mlruns``).

Both are optional extras; asking for one that is not installed is a one-line
error naming the extra. The MLflow client (not the fluent ``mlflow.*`` API,
which keeps one global active run) is used so that trials running in
threads (``imgcls tune --jobs``) each log to their own run.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgcls.errors import UsageError

MLFLOW_RUN_FILE = "mlflow.json"  # the MLflow run id, so a resumed run continues it


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"optimizer": {"lr": 0.1}}}`` -> ``{"train.optimizer.lr": 0.1}``;
    list items as ``[i]``, the key paths ``--set`` and tune spaces use."""
    out: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(data, (list, tuple)) and any(isinstance(v, (dict, list, tuple)) for v in data):
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}[{i}]"))
    else:
        out[prefix] = list(data) if isinstance(data, tuple) else data
    return out


def require(module: str, extra: str):
    """Import an optional dependency, or fail in one line naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"{extra} is not installed: pip install 'imgcls[{extra}]' (or pip install {extra})"
        ) from None


class TensorBoardTracker:
    def __init__(self, run_dir: Path):
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def start(self, recipe: dict, run_info: dict) -> None:
        params = {
            k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(recipe).items()
        }
        self.writer.add_text("recipe", "\n".join(f"    {k}: {v}" for k, v in params.items()))
        self.writer.add_text("run", json.dumps(run_info))

    def epoch(self, row: dict) -> None:
        step = row["epoch"]
        for key, value in row.items():
            if key == "epoch" or value is None:
                continue
            # loss/train, loss/val side by side in one chart; the rest as they are
            kind, _, split = key.partition("_")
            tag = f"{split}/{kind}" if kind in ("train", "val") else key
            self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def finish(self, best: Path | None, completed: bool) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, run_dir: Path, experiment: str):
        require("mlflow", "mlflow")
        import mlflow
        from mlflow.tracking import MlflowClient

        self.run_dir = run_dir
        self.client = MlflowClient(mlflow.get_tracking_uri())
        saved = run_dir / MLFLOW_RUN_FILE
        self.resumed = saved.exists()
        if self.resumed:
            self.run_id = json.loads(saved.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        run = self.client.create_run(experiment_id, run_name=f"{run_dir.parent.name}/{run_dir.name}")
        self.run_id = run.info.run_id
        from imgcls.io import write_text_atomic

        write_text_atomic(
            saved, json.dumps({"run_id": self.run_id, "tracking_uri": self.client.tracking_uri})
        )

    def start(self, recipe: dict, run_info: dict) -> None:
        if self.resumed:  # params are immutable in MLflow; the first start logged them
            return
        from mlflow.entities import Param, RunTag

        params = [
            # MLflow keys allow no brackets: model.layers[0].conv.filters -> model.layers.0.conv.filters
            Param(re.sub(r"\[(\d+)\]", r".\1", k), json.dumps(v) if isinstance(v, list) else str(v))
            for k, v in flatten(recipe).items()
        ]
        tags = [RunTag("run_dir", str(self.run_dir.resolve()))]
        tags += [RunTag(k, str(v)) for k, v in run_info.items()]
        for i in range(0, len(params), 100):  # MLflow's per-batch limit
            self.client.log_batch(self.run_id, params=params[i : i + 100], tags=tags if i == 0 else [])

    def epoch(self, row: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        step = int(row["epoch"])
        metrics = [Metric(k, float(v), now, step) for k, v in row.items() if k != "epoch" and v is not None]
        self.client.log_batch(self.run_id, metrics=metrics)

    def finish(self, best: Path | None, completed: bool) -> None:
        if best is not None and best.exists():
            self.client.log_artifact(self.run_id, str(best))
        self.client.set_terminated(self.run_id, status="FINISHED" if completed else "KILLED")


class Trackers:
    """The trackers of one run, called as one; a failing tracker is logged, not
    fatal, once training has started (the run folder stays the record)."""

    def __init__(self, trackers: list, log: Callable[[str], None]):
        self.trackers, self.log = trackers, log

    def _each(self, method: str, *args: Any) -> None:
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(*args)
            except Exception as exc:  # a tracker server gone away must not cost the run
                self.log(f"warning: {type(tracker).__name__} {method} failed, disabled: {exc}")
                self.trackers.remove(tracker)

    def start(self, recipe: dict, run_info: dict) -> None:
        self._each("start", recipe, run_info)

    def epoch(self, row: dict) -> None:
        self._each("epoch", row)

    def finish(self, best: Path | None, completed: bool = True) -> None:
        self._each("finish", best, completed)


def check_trackers(log_to: list[str]) -> None:
    """Fail before any work when a tracker's library is missing."""
    for name in ("tensorboard", "mlflow"):
        if name in log_to:
            require(name, name)


def open_tracker(log_to: list[str], run_dir: Path, log: Callable[[str], None] = print) -> Trackers:
    """The trackers ``train.log_to`` asks for (csv needs none: train writes metrics.csv)."""
    trackers: list = []
    if "tensorboard" in log_to:
        trackers.append(TensorBoardTracker(run_dir))
        log(f"tensorboard: tensorboard --logdir {run_dir.parent}")
    if "mlflow" in log_to:
        name = run_dir.parent.name  # the recipe (or study) name: one MLflow experiment per recipe
        tracker = MLflowTracker(run_dir, name)
        trackers.append(tracker)
        log(f"mlflow: run {tracker.run_id} in experiment '{name}' at {tracker.client.tracking_uri}")
    return Trackers(trackers, log)
