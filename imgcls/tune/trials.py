"""Running trials: in this process (a thread), or in ``jobs`` spawned worker
processes that share the study through its storage and claim trials under a
file lock, so the study ends with exactly ``trials``. Never in threads side by
side: a trial sets process-wide state (torch's RNG, threads, determinism).
"""

from __future__ import annotations

import multiprocessing
import pickle
import queue as queue_module
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from imgcls import interrupts
from imgcls.errors import ImgclsError, Interrupted, UsageError
from imgcls.tune.space import Param, fmt, with_params

PRUNERS = ("median", "hyperband", "none")
CLAIM_LOCK = ".claim.lock"  # in the study folder: workers take trials one at a time


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


def make_pruner(name: str, startup: int, epochs: int):
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    if name == "none":
        return optuna.pruners.NopPruner()
    raise UsageError(f"unknown pruner '{name}' (choose from: {', '.join(PRUNERS)})")


def study_storage(url: str):
    """Optuna's storage for ``url``; SQLite waits for the other trial processes' writes."""
    if not url.startswith("sqlite:"):
        return url
    import optuna

    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})


def make_sampler(seed: int, trials_before: int, worker: int):
    """TPE seeded by ``seed``, the trials the study held before (a rerun does
    not redraw the first values) and the worker."""
    import numpy as np
    import optuna

    state = np.random.SeedSequence([seed & 0xFFFFFFFF, trials_before, worker]).generate_state(1)[0]
    return optuna.samplers.TPESampler(seed=int(state))


def run_trials(job: TrialJob, study, stop, abort, log) -> None:
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

    from imgcls.training import train

    metric = job.metric
    values = {p.key: p.suggest(trial) for p in job.params}
    recipe = with_params(job.raw, values, str(job.recipe_path))
    run_dir = job.folder / str(trial.number)
    trial.set_user_attr("run_dir", str(run_dir))
    shown = ", ".join(f"{k}={fmt(v)}" for k, v in values.items())
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


def run_workers(job: TrialJob, jobs: int, stop, abort, log) -> None:
    """``jobs`` spawned processes run :func:`run_trials`; their lines come
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
    interrupts.block_in_this_thread()
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
    """A trial worker process (see :func:`run_workers`)."""
    interrupts.ignore(unblock=True)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    log = lambda message: lines.put(("log", message))  # noqa: E731

    def run() -> None:
        try:
            study = optuna.load_study(
                study_name=job.study_name,
                storage=study_storage(job.storage_url),
                sampler=make_sampler(job.seed, job.trials_before, worker),
                pruner=make_pruner(job.pruner, job.startup_trials, job.epochs),
            )
            run_trials(job, study, stop, abort, log)
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
