"""Hyperparameter search on Optuna: a space file, trials that are normal runs.

The space is a YAML mapping from the dotted key paths ``--set`` uses to a
distribution, one per line::

    train.optimizer.lr: {loguniform: [1e-4, 1e-1]}     # float, log scale
    data.augment.mixup: {uniform: [0, 0.4]}            # float, linear
    train.batch_size: {int: [16, 128]}                 # integer, both ends included
    model.layers[0].conv.filters: {choice: [16, 32, 64]}
    train.optimizer.name: {choice: [adam, sgd]}

Every key path and every end of every range is checked against the recipe
schema before a trial runs; errors name the space file's line.

Each trial is ``imgcls train`` with those values set, into
``<train.out>/<study>/<trial number>/``; its value is ``metric`` (val_acc by
default) at the epoch whose weights ``best.safetensors`` keeps (the epoch
``train.early_stopping.monitor`` chose), and each epoch's ``metric`` is
reported so the pruner can stop it early. The study lives in
``<study folder>/study.db`` (SQLite) unless ``storage`` names another
database, which several processes may share.

``jobs`` > 1 runs trials in that many worker processes (spawned), never in
threads: a trial sets process-wide state (torch's RNG, threads and
determinism). The workers share the study through its storage and claim
trials under a file lock, so the study ends with exactly ``trials``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import pickle
import queue as queue_module
import re
import shutil
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgcls import interrupts
from imgcls.errors import ImgclsError, Interrupted, RecipeError, UsageError
from imgcls.recipe import NAME_PATTERN, Recipe, read_yaml_file, recipe_from_dict, recipe_to_dict

DISTRIBUTIONS = ("loguniform", "uniform", "int", "choice")
METRICS = {"val_acc": "maximize", "val_loss": "minimize", "train_acc": "maximize", "train_loss": "minimize"}
PRUNERS = ("median", "hyperband", "none")
STUDY_DB = "study.db"
CLAIM_LOCK = ".claim.lock"  # in the study folder: workers take trials one at a time


@dataclass(frozen=True)
class Param:
    key: str  # dotted key path, as --set takes it
    kind: str  # one of DISTRIBUTIONS
    values: tuple  # (low, high) or the choices
    line: int

    def suggest(self, trial) -> Any:
        if self.kind == "loguniform":
            return trial.suggest_float(self.key, *self.values, log=True)
        if self.kind == "uniform":
            return trial.suggest_float(self.key, *self.values)
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_categorical(self.key, list(self.values))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def with_params(raw: dict, params: dict[str, Any], where: str = "<recipe>") -> Recipe:
    """The recipe dict with ``params`` set as ``--set`` would, validated."""
    # values travel as JSON, which the recipe's YAML loader reads back exactly
    return recipe_from_dict(raw, where, overrides=[f"{k}={json.dumps(v)}" for k, v in params.items()])


def load_space(path: Path, raw_recipe: dict, where_recipe: str = "<recipe>") -> list[Param]:
    """Read and check a space file against the recipe it will modify."""
    data, lines = read_yaml_file(path, "space")
    if not isinstance(data, dict) or not data:
        raise RecipeError(
            f"{path}:1: a search space maps key paths to distributions, "
            "e.g. 'train.optimizer.lr: {loguniform: [1e-4, 1e-1]}'"
        )
    params = []
    for key, spec in data.items():
        line = lines.get((key,), 1)
        where = f"{path}:{line} {key}"
        if not isinstance(spec, dict) or len(spec) != 1:
            raise RecipeError(f"{where}: give one distribution: {{{'|'.join(DISTRIBUTIONS)}: [...]}}")
        ((kind, values),) = spec.items()
        if kind not in DISTRIBUTIONS:
            import difflib

            close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(
                f"{where}: unknown distribution '{kind}'{hint} (choose from: {', '.join(DISTRIBUTIONS)})"
            )
        if not isinstance(values, list) or not values:
            raise RecipeError(
                f"{where}: {kind} takes a list, e.g. {kind}: {'[a, b]' if kind == 'choice' else '[low, high]'}"
            )
        if kind == "choice":
            bad = [v for v in values if not (v is None or isinstance(v, (bool, int, float, str)))]
            if bad:
                raise RecipeError(
                    f"{where}: choices must be plain values (numbers, text, true/false); got {bad[0]!r}"
                )
            if len(set(map(repr, values))) != len(values):
                raise RecipeError(f"{where}: a choice is listed twice")
        else:
            if len(values) != 2 or not all(_number(v) for v in values):
                raise RecipeError(f"{where}: {kind} takes [low, high], two numbers")
            low, high = values
            if kind == "int" and not all(isinstance(v, int) for v in values):
                raise RecipeError(f"{where}: int takes whole numbers [low, high]")
            if not low < high:
                raise RecipeError(f"{where}: low ({low}) must be below high ({high})")
            if kind == "loguniform" and low <= 0:
                raise RecipeError(f"{where}: loguniform needs low > 0 (got {low})")
        param = Param(str(key), kind, tuple(values), line)
        for value in values:  # every end of the range must make a valid recipe
            try:
                with_params(raw_recipe, {param.key: value}, where_recipe)
            except RecipeError as exc:
                message = str(exc)
                if message.startswith("--set "):  # "--set key: path: msg" -> "path: msg"
                    message = message.split(": ", 1)[1]
                if not message.startswith(param.key.split(".")[0]) and not message.startswith(param.key):
                    message = f"{param.key}: {message}"
                raise RecipeError(f"{path}:{line} {message} (with {param.key} = {value!r})") from None
        params.append(param)
    return params


def default_space_path(recipe_path: Path) -> Path:
    return recipe_path.with_name(recipe_path.stem + ".space.yaml")


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


def _make_pruner(name: str, startup: int, epochs: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UsageError(f"unknown pruner '{name}' (choose from: {', '.join(PRUNERS)})")


def tune(
    recipe_path: Path,
    *,
    trials: int,
    space: Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    storage: str | None = None,
    study: str | None = None,
    timeout: float | None = None,
    jobs: int = 1,
    metric: str = "val_acc",
    pruner: str = "median",
    startup_trials: int = 2,
    seed: int | None = None,
    log: Callable[[str], None] = print,
    stop_after_trials: int | None = None,
) -> TuneResult:
    """Run trials until the study holds ``trials`` finished ones (complete or
    pruned), ``timeout`` seconds pass, or Ctrl-C; then summarise the study.

    A rerun with the same study continues it. ``seed`` (default: the recipe's
    ``train.seed``) seeds the sampler: the same command tries the same values.
    ``stop_after_trials`` behaves like Ctrl-C once that many trials ran in
    this call (for tests).
    """
    from imgcls.recipe import load_recipe
    from imgcls.tracking import require

    if metric not in METRICS:
        raise UsageError(f"unknown metric '{metric}' (choose from: {', '.join(METRICS)})")
    if jobs < 1 or trials < 1:
        raise UsageError("--trials and --jobs must be at least 1")
    base = load_recipe(recipe_path, overrides)  # checks the recipe before the space
    raw = recipe_to_dict(base)
    if base.data.path:  # trials run from their own folders: make the data path absolute
        from imgcls.data.sources import resolve

        raw["data"]["path"] = str(resolve(base.data.path, recipe_path.parent).resolve())
    study_name = study or f"{base.name}-tune"
    if not re.fullmatch(NAME_PATTERN, study_name):  # it names a folder under train.out
        raise UsageError(
            f"--study {study_name!r}: a study name is letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (like a recipe's name)"
        )
    space = space or default_space_path(recipe_path)
    if not space.exists():
        raise UsageError(f"{space}: no search space file (write one, or give --space FILE)")
    params = load_space(space, raw, str(recipe_path))
    optuna = require("optuna", "tune")
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    folder = Path(base.train.out) / study_name
    seed = base.train.seed if seed is None else seed
    interrupts.check()  # a Ctrl-C that compiled code swallowed: no study folder
    with _removed_if_failed(folder):
        storage_url = storage or f"sqlite:///{(folder / STUDY_DB).resolve()}"
        direction = METRICS[metric]
        try:
            the_study = optuna.create_study(
                study_name=study_name,
                storage=_storage(storage_url),
                load_if_exists=True,
                direction=direction,
                pruner=_make_pruner(pruner, startup_trials, base.train.epochs),
            )
        except Exception as exc:  # a bad URL or an unreachable database
            raise UsageError(f"--storage {storage_url}: {type(exc).__name__}: {exc}") from None
        if the_study.direction.name.lower() != direction:
            raise UsageError(
                f"study '{study_name}' {the_study.direction.name.lower()}s; --metric {metric} would {direction} "
                "(use the study's metric or a new --study)"
            )
        the_study.set_user_attr("metric", metric)
        done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        already = len(the_study.get_trials(deepcopy=False, states=done_states))
        if not the_study.trials:
            stale = [p.name for p in folder.iterdir() if p.name.isdigit() and any(p.iterdir())]
            if stale:
                raise UsageError(
                    f"{folder}: holds trial folders ({', '.join(sorted(stale)[:3])}...) but study '{study_name}' "
                    f"in {storage_url} has no trials; choose another --study or move the folder"
                )
        log(
            f"study '{study_name}': {already} of {trials} trials done; folder {folder}, storage {storage_url}"
        )

        job = TrialJob(
            recipe_path,
            raw,
            params,
            folder,
            storage_url,
            study_name,
            metric,
            direction,
            trials,
            None if timeout is None else time.time() + timeout,
            uuid.uuid4().hex,
            seed,
            len(the_study.trials),
            pruner,
            startup_trials,
            base.train.epochs,
            stop_after_trials,
        )
        if jobs == 1:
            stop, abort = threading.Event(), threading.Event()
        else:
            spawn = multiprocessing.get_context("spawn")
            stop, abort = spawn.Event(), spawn.Event()  # first Ctrl-C: no new trial; second: end them
        the_study.sampler = _sampler(seed, job.trials_before, 0)

        # the trials run in a worker thread (with --jobs, it runs the worker
        # processes): train() then leaves SIGINT alone, and the main thread turns
        # Ctrl-C into "finish this trial, then stop"
        errors: list[BaseException] = []

        def work() -> None:
            try:
                if jobs == 1:
                    _run_trials(job, the_study, stop, abort, log)
                else:
                    _run_workers(job, jobs, stop, abort, log)
            except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
                errors.append(exc)

        def on_sigint(signum, frame) -> None:
            if stop.is_set():
                abort.set()
                log("stopping the running trial at the end of its epoch")
            else:
                stop.set()
                log("stopping after the current trial (Ctrl-C again to end it at its epoch's end)")

        if interrupts.pressed():  # swallowed since: as a Ctrl-C during a trial, no new trial
            stop.set()
        if already < trials and not stop.is_set():
            worker = threading.Thread(target=work, name="imgcls-tune")
            previous = None
            if threading.current_thread() is threading.main_thread():
                previous = signal.signal(signal.SIGINT, on_sigint)
            try:
                worker.start()
                while worker.is_alive():
                    worker.join(0.2)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGINT, previous)
            if errors:
                raise errors[0]
        return summarise(the_study, folder, storage_url, metric, log, interrupted=stop.is_set())


@contextmanager
def _removed_if_failed(folder: Path) -> Iterator[None]:
    """Make ``folder``; if the block fails before any trial folder is in it,
    remove what this made (nothing of it is the user's yet)."""
    made = folder  # the first missing folder on the way
    while not made.parent.exists():
        made = made.parent
    existed = folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if not existed and not any(p.name.isdigit() for p in folder.iterdir()):
            shutil.rmtree(made, ignore_errors=True)
        raise


@dataclass(frozen=True)
class TrialJob:
    """What a trial runner needs, in one process or a worker (picklable)."""

    recipe_path: Path
    raw: dict
    params: list[Param]
    folder: Path
    storage_url: str
    study_name: str
    metric: str
    direction: str
    trials: int
    deadline: float | None
    session: str  # marks the trials this tune call claimed
    seed: int
    trials_before: int  # in the study when this call began (seeds the samplers)
    pruner: str
    startup_trials: int
    epochs: int
    stop_after_trials: int | None


def _storage(url: str):
    """Optuna's storage for ``url``; SQLite waits for the other trial processes' writes."""
    if not url.startswith("sqlite:"):
        return url
    import optuna

    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def _sampler(seed: int, trials_before: int, worker: int):
    """TPE seeded by ``seed``, the trials the study held before (a rerun does
    not redraw the first values) and the worker."""
    import numpy as np
    import optuna

    state = np.random.SeedSequence([seed & 0xFFFFFFFF, trials_before, worker]).generate_state(1)[0]
    return optuna.samplers.TPESampler(seed=int(state))


def _run_trials(job: TrialJob, study, stop, abort, log) -> None:
    """Claim and run trials until the study holds ``job.trials`` finished or
    claimed ones, the deadline passes, or ``stop``. Claiming (count, then
    ask) happens under a file lock, so parallel runners never overshoot."""
    import optuna
    from filelock import FileLock

    TrialState = optuna.trial.TrialState
    claim = FileLock(job.folder / CLAIM_LOCK)
    while not stop.is_set():
        if job.deadline is not None and time.time() >= job.deadline:
            return
        with claim:
            everything = study.get_trials(deepcopy=False)
            ours = [t for t in everything if t.user_attrs.get("tune_session") == job.session]
            done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in everything)
            if done + sum(t.state == TrialState.RUNNING for t in ours) >= job.trials:
                return
            if job.stop_after_trials is not None and len(ours) >= job.stop_after_trials:
                stop.set()  # as Ctrl-C would
                return
            trial = study.ask()
            trial.set_user_attr("tune_session", job.session)
        _run_trial(job, study, trial, abort, log)


def _run_trial(job: TrialJob, study, trial, abort, log) -> None:
    import optuna

    from imgcls.train import train

    metric = job.metric
    values = {p.key: p.suggest(trial) for p in job.params}
    recipe = with_params(job.raw, values, str(job.recipe_path))
    run_dir = job.folder / str(trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
    log(f"trial {trial.number}: {shown}")
    measured: dict[int, float] = {}  # epoch -> metric

    def on_epoch_end(row: dict) -> None:
        value = row.get(metric)
        if value is None:
            raise UsageError(
                f"metric '{metric}' is not measured (no validation split?); use --metric train_loss"
            )
        measured[row["epoch"]] = value
        trial.report(value, row["epoch"])
        if abort.is_set():
            raise Interrupted(
                f"trial {trial.number} stopped after epoch {row['epoch']} (its run folder is saved)"
            )
        # the last epoch is done anyway: pruning it would only lose its value
        if row["epoch"] < recipe.train.epochs and trial.should_prune():
            log(f"trial {trial.number}: pruned after epoch {row['epoch']} ({metric} {value:.4f})")
            raise optuna.TrialPruned()

    quiet = lambda message: None  # noqa: E731  (the trial lines say what matters)
    try:
        result = train(
            recipe, base_dir=job.recipe_path.parent, out=run_dir, log=quiet, on_epoch_end=on_epoch_end
        )
    except optuna.TrialPruned:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return
    except BaseException:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        raise
    # the value of the epoch whose weights the run keeps (best.safetensors
    # follows train.early_stopping.monitor, which need not be --metric)
    epoch = result.best_epoch or max(measured)
    log(f"trial {trial.number}: {metric} {measured[epoch]:.4f} (epoch {epoch})")
    study.tell(trial, measured[epoch])


def _run_workers(job: TrialJob, jobs: int, stop, abort, log) -> None:
    """``jobs`` spawned processes run :func:`_run_trials`; their lines come
    back through a queue. A worker's error stops new trials everywhere and
    is raised here once all have ended."""
    from imgcls.data.batch_decode import main_importable

    if not main_importable():
        raise UsageError(
            "--jobs > 1 starts worker processes, which import this program's __main__ again: "
            "run it from a file (or use --jobs 1)"
        )
    spawn = multiprocessing.get_context("spawn")
    lines = spawn.Queue()
    # Ctrl-C is the parent's (it sets stop/abort): workers start with SIGINT
    # blocked (inherited from this thread) and ignore it before unblocking
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    procs = [
        spawn.Process(target=_worker_main, args=(job, i + 1, lines, stop, abort), name=f"imgcls-tune-{i + 1}")
        for i in range(jobs)
    ]
    for p in procs:
        p.start()
    errors: list[BaseException] = []

    def take(timeout: float) -> bool:
        try:
            kind, payload = lines.get(timeout=timeout)
        except queue_module.Empty:
            return False
        if kind == "log":
            log(payload)
        else:
            errors.append(pickle.loads(payload))
            stop.set()
        return True

    while any(p.is_alive() for p in procs):
        take(0.2)
    for p in procs:
        p.join()
    while take(0.05):
        pass
    if errors:
        raise errors[0]
    dead = [p.exitcode for p in procs if p.exitcode != 0]
    if dead:
        raise ImgclsError(
            f"a trial process ended with exit code {dead[0]}; rerun the command to continue the study"
        )


def _worker_main(job: TrialJob, worker: int, lines, stop, abort) -> None:
    """A trial worker process (see :func:`_run_workers`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = lambda message: lines.put(("log", message))  # noqa: E731

    def run() -> None:
        try:
            study = optuna.load_study(
                study_name=job.study_name,
                storage=_storage(job.storage_url),
                sampler=_sampler(job.seed, job.trials_before, worker),
                pruner=_make_pruner(job.pruner, job.startup_trials, job.epochs),
            )
            _run_trials(job, study, stop, abort, log)
        except BaseException as exc:  # noqa: BLE001  (raised again in the parent)
            try:
                payload = pickle.dumps(exc)
            except Exception:  # noqa: BLE001
                payload = pickle.dumps(ImgclsError(f"{type(exc).__name__}: {exc}"))
            lines.put(("error", payload))

    # in a thread, as in the parent: train() then leaves SIGINT (ignored) alone
    thread = threading.Thread(target=run, name="imgcls-tune-trials")
    thread.start()
    thread.join()
    lines.close()
    lines.join_thread()


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summarise(
    study, folder: Path, storage_url: str, metric: str, log, interrupted: bool = False
) -> TuneResult:
    """The table of trials (best first), best.yaml, trials.csv and importance.png."""
    import optuna

    from imgcls.checkpoint import atomic_path, write_text_atomic

    direction = study.direction.name.lower()
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

    complete = [r for r in rows if r.state == "complete"]
    best = complete[0] if complete else None
    best_yaml = None
    if best is not None:
        source = Path(best.run_dir) / "recipe.yaml"
        if source.exists():
            header = (
                f"# best trial {best.number} of study '{study.study_name}': {metric} {best.value:.6g}\n"
                + "".join(f"# {k}: {_fmt(v)}\n" for k, v in best.params.items())
                + f"# retrain: imgcls train {folder / 'best.yaml'}\n"
            )
            best_yaml = folder / "best.yaml"
            write_text_atomic(best_yaml, header + source.read_text(encoding="utf-8"))

    buffer = io.StringIO()
    keys = sorted({k for r in rows for k in r.params})
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["trial", "state", metric, "epochs", "seconds", *keys, "run_dir"])
    for r in rows:
        writer.writerow(
            [r.number, r.state, r.value, r.epochs, r.seconds, *(r.params.get(k) for k in keys), r.run_dir]
        )
    write_text_atomic(folder / "trials.csv", buffer.getvalue())

    importances: dict = {}
    png = None
    if len(complete) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            try:
                importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
                ax = optuna.visualization.matplotlib.plot_param_importances(study, evaluator=evaluator)
                png = folder / "importance.png"
                with atomic_path(png) as tmp:
                    ax.figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
                plt.close(ax.figure)
            except (RuntimeError, ValueError) as exc:  # e.g. every trial drew the same values
                log(f"no parameter importance: {exc}")
                png = None
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
