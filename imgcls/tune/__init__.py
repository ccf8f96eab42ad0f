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

import multiprocessing
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from imgcls import interrupts
from imgcls.errors import UsageError
from imgcls.recipe import NAME_PATTERN, recipe_to_dict
from imgcls.tune.results import TrialRow, TuneResult, summarise
from imgcls.tune.space import DISTRIBUTIONS, Param, default_space_path, load_space, with_params
from imgcls.tune.trials import (
    PRUNERS,
    TrialJob,
    make_pruner,
    make_sampler,
    run_trials,
    run_workers,
    study_storage,
)

__all__ = [
    "DISTRIBUTIONS",
    "METRICS",
    "PRUNERS",
    "Param",
    "TrialRow",
    "TuneResult",
    "default_space_path",
    "load_space",
    "summarise",
    "tune",
    "with_params",
]

METRICS = {"val_acc": "maximize", "val_loss": "minimize", "train_acc": "maximize", "train_loss": "minimize"}
STUDY_DB = "study.db"


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
    study_name = _study_name(study or f"{base.name}-tune")
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
        the_study = _open_study(optuna, study_name, storage_url, metric, pruner, startup_trials, base, folder)
        done_states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        already = len(the_study.get_trials(deepcopy=False, states=done_states))
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
            METRICS[metric],
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
        the_study.sampler = make_sampler(seed, job.trials_before, 0)
        stop = _run(the_study, job, jobs, log) if already < trials else threading.Event()
        return summarise(the_study, folder, storage_url, metric, log, interrupted=stop.is_set())


def _study_name(name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name):  # it names a folder under train.out
        raise UsageError(
            f"--study {name!r}: a study name is letters, digits, '_', '.' and '-', "
            "starting with a letter or digit (like a recipe's name)"
        )
    return name


def _open_study(optuna, study_name, storage_url, metric, pruner, startup_trials, base, folder: Path):
    """The study, created or continued; refused when its direction or its folder disagree."""
    direction = METRICS[metric]
    try:
        the_study = optuna.create_study(
            study_name=study_name,
            storage=study_storage(storage_url),
            load_if_exists=True,
            direction=direction,
            pruner=make_pruner(pruner, startup_trials, base.train.epochs),
        )
    except Exception as exc:  # a bad URL or an unreachable database
        raise UsageError(f"--storage {storage_url}: {type(exc).__name__}: {exc}") from None
    if the_study.direction.name.lower() != direction:
        raise UsageError(
            f"study '{study_name}' {the_study.direction.name.lower()}s; --metric {metric} would {direction} "
            "(use the study's metric or a new --study)"
        )
    the_study.set_user_attr("metric", metric)
    if not the_study.trials:
        stale = [p.name for p in folder.iterdir() if p.name.isdigit() and any(p.iterdir())]
        if stale:
            raise UsageError(
                f"{folder}: holds trial folders ({', '.join(sorted(stale)[:3])}...) but study '{study_name}' "
                f"in {storage_url} has no trials; choose another --study or move the folder"
            )
    return the_study


def _run(the_study, job: TrialJob, jobs: int, log):
    """Run the trials; return the ``stop`` event (set: Ctrl-C, or stop_after_trials).

    The trials run in a worker thread (with --jobs, it runs the worker
    processes): train() then leaves SIGINT alone, and the main thread turns
    Ctrl-C into "finish this trial, then stop"; a second one ends the running
    trials at their epoch's end."""
    stop: Any  # a threading.Event, or a multiprocessing one the worker processes share
    abort: Any
    if jobs == 1:
        stop, abort = threading.Event(), threading.Event()
    else:
        spawn = multiprocessing.get_context("spawn")
        stop, abort = spawn.Event(), spawn.Event()
    if interrupts.pressed():  # swallowed since: as a Ctrl-C during a trial, no new trial
        stop.set()
        return stop
    errors: list[BaseException] = []

    def work() -> None:
        try:
            if jobs == 1:
                run_trials(job, the_study, stop, abort, log)
            else:
                run_workers(job, jobs, stop, abort, log)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the main thread)
            errors.append(exc)

    def on_sigint(presses: int) -> None:
        if stop.is_set():
            abort.set()
            log("stopping the running trial at the end of its epoch")
        else:
            stop.set()
            log("stopping after the current trial (Ctrl-C again to end it at its epoch's end)")

    worker = threading.Thread(target=work, name="imgcls-tune")
    with interrupts.handled(on_sigint):
        worker.start()
        while worker.is_alive():
            worker.join(0.2)
    if errors:
        raise errors[0]
    return stop


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
