"""A study's outcome: the table of trials (best first), best.yaml,
trials.csv and importance.png in the study folder."""

from __future__ import annotations

import csv
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgcls.tune.space import fmt


@dataclass
class TrialRow:
    number: int
    state: str
    value: float | None
    epochs: int
    params: dict
    run_dir: str
    seconds: float | None

    def to_dict(self) -> dict:
        return self.__dict__.copy()


@dataclass
class TuneResult:
    study: str
    folder: Path
    storage: str
    metric: str
    direction: str
    trials: list[TrialRow]  # sorted, best first; unfinished last
    best: TrialRow | None
    best_yaml: Path | None
    importance_png: Path | None
    importances: dict = field(default_factory=dict)
    interrupted: bool = False

    def to_dict(self) -> dict:
        return {
            "study": self.study,
            "folder": str(self.folder),
            "storage": self.storage,
            "metric": self.metric,
            "direction": self.direction,
            "best": self.best.to_dict() if self.best else None,
            "best_yaml": str(self.best_yaml) if self.best_yaml else None,
            "importance_png": str(self.importance_png) if self.importance_png else None,
            "importances": self.importances,
            "interrupted": self.interrupted,
            "trials": [t.to_dict() for t in self.trials],
        }


def summarise(
    study, folder: Path, storage_url: str, metric: str, log, interrupted: bool = False
) -> TuneResult:
    """The table of trials (best first), best.yaml, trials.csv and importance.png."""
    direction = study.direction.name.lower()
    rows = _trial_rows(study, direction)
    complete = [r for r in rows if r.state == "complete"]
    best = complete[0] if complete else None
    best_yaml = _write_best_yaml(study, folder, metric, best) if best is not None else None
    _write_trials_csv(folder / "trials.csv", rows, metric)
    importances: dict = {}
    png = None
    if len(complete) >= 2:
        importances, png = _importance(study, folder, log)
    else:
        log("parameter importance needs 2 or more completed trials")
    return TuneResult(
        study.study_name,
        folder,
        storage_url,
        metric,
        direction,
        rows,
        best,
        best_yaml,
        png,
        {k: round(float(v), 4) for k, v in importances.items()},
        interrupted,
    )


def _trial_rows(study, direction: str) -> list[TrialRow]:
    """One row per trial: complete ones best first, then pruned, then the rest."""
    import optuna

    rows = []
    for t in study.trials:
        seconds = (
            (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start
            else None
        )
        value = t.value if t.state == optuna.trial.TrialState.COMPLETE else None
        if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        rows.append(
            TrialRow(
                t.number,
                t.state.name.lower(),
                value,
                len(t.intermediate_values),
                dict(t.params),
                t.user_attrs.get("run_dir", ""),
                round(seconds, 1) if seconds is not None else None,
            )
        )
    sign = -1 if direction == "maximize" else 1
    rank = {"complete": 0, "pruned": 1}
    rows.sort(
        key=lambda r: (rank.get(r.state, 2), sign * r.value if r.value is not None else math.inf, r.number)
    )
    return rows


def _write_best_yaml(study, folder: Path, metric: str, best: TrialRow) -> Path | None:
    """best.yaml: the best trial's recipe, a plain recipe to retrain with."""
    from imgcls.io import write_text_atomic

    source = Path(best.run_dir) / "recipe.yaml"
    if not source.exists():
        return None
    header = (
        f"# best trial {best.number} of study '{study.study_name}': {metric} {best.value:.6g}\n"
        + "".join(f"# {k}: {fmt(v)}\n" for k, v in best.params.items())
        + f"# retrain: imgcls train {folder / 'best.yaml'}\n"
    )
    best_yaml = folder / "best.yaml"
    write_text_atomic(best_yaml, header + source.read_text(encoding="utf-8"))
    return best_yaml


def _write_trials_csv(path: Path, rows: list[TrialRow], metric: str) -> None:
    from imgcls.io import write_text_atomic

    buffer = io.StringIO()
    keys = sorted({k for r in rows for k in r.params})
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "state", metric, "epochs", "seconds", *keys, "run_dir"])
    for r in rows:
        writer.writerow(
            [r.number, r.state, r.value, r.epochs, r.seconds, *(r.params.get(k) for k in keys), r.run_dir]
        )
    write_text_atomic(path, buffer.getvalue())


def _importance(study, folder: Path, log) -> tuple[dict, Path | None]:
    """fANOVA parameter importances, and importance.png (none when they cannot be computed)."""
    import optuna

    from imgcls.io import atomic_path

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances: dict = {}
        try:
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
            ax: Any = optuna.visualization.matplotlib.plot_param_importances(study, evaluator=evaluator)
            png = folder / "importance.png"
            with atomic_path(png) as tmp:
                ax.figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            return importances, png
        except (RuntimeError, ValueError) as exc:  # e.g. every trial drew the same values
            log(f"no parameter importance: {exc}")
            return importances, None
