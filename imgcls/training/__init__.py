"""Training: fit a recipe's network and write its run folder.

The whole run on one page, as a reader would tell it::

    run = prepare(recipe)                      # setup: device, data, model, optimizer, run folder
    while epochs are left:
        train_one_epoch(run)                   # loop: batch -> augment -> forward -> loss -> step
        row = epoch_row(run)                   # validation
        record_epoch(run, row)                 # state: best.safetensors, last + resume.pt
        write_metrics(run.run_dir, history)    # outputs: metrics.csv (curves and report at the end)

Ctrl-C stops after the running step with the state saved (a second one
aborts); ``imgcls train --resume RUN`` continues exactly there.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imgcls import checkpoint as ck
from imgcls import distributed, interrupts
from imgcls.errors import Interrupted
from imgcls.recipe import Recipe
from imgcls.tracking import open_tracker
from imgcls.training import loop
from imgcls.training.outputs import plot_curves, write_metrics
from imgcls.training.progress import Progress, epoch_line
from imgcls.training.setup import prepare
from imgcls.training.state import Log, Run, record_epoch
from imgcls.training.validation import epoch_row


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    best_epoch: int
    best: dict
    stopped_early: bool


def train(
    recipe: Recipe,
    *,
    base_dir: Path = Path("."),
    out: Path | None = None,
    resume: Path | None = None,
    log: Log = _stderr,
    progress: bool = False,
    stop_after_steps: int | None = None,
    on_epoch_end: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Fit ``recipe``; write the run folder; return its history.

    ``resume`` continues a run folder where it stopped. ``stop_after_steps``
    behaves like Ctrl-C after that many optimizer steps (for tests).
    ``on_epoch_end(row)`` is called after each finished epoch, once its
    checkpoints and metrics.csv are written; what it raises propagates.
    """
    group = distributed.join(recipe.train.device)  # one process unless torchrun started several
    try:
        if not group.main:
            log, progress = (lambda message: None), False
        out, resume = distributed.restart_target(group, recipe, out, resume, log)
        try:
            result = _train(
                recipe, group, base_dir, out, resume, log, progress, stop_after_steps, on_epoch_end
            )
        except RuntimeError as exc:
            broken = distributed.broken_group(group, exc)
            if broken is None:
                raise
            raise broken from None
        if group.main:
            distributed.forget_run_dir(recipe)
        return result
    finally:
        group.close()


def _train(
    recipe, group, base_dir, out, resume, log, progress, stop_after_steps, on_epoch_end
) -> TrainResult:
    run = prepare(recipe, base_dir=base_dir, out=out, resume=resume, log=log, group=group)
    spec = run.spec
    interrupted = {"flag": False}

    def on_sigint(presses: int) -> None:
        if presses > 1:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        interrupted["flag"] = True
        log("stopping after this step (Ctrl-C again to abort without saving)")

    bar = Progress(progress, spec.epochs, run.steps_per_epoch)
    stopped_early = False
    tracker = None  # train.log_to: opened at the first finished epoch, so a failed start leaves none
    steps_left = stop_after_steps
    with interrupts.handled(on_sigint):
        try:
            interrupts.check()  # one swallowed before the handler above took over
            while run.state.epoch < spec.epochs:
                finished, steps_left = loop.train_one_epoch(run, bar, interrupted, steps_left)
                if not finished:
                    raise Interrupted(
                        f"interrupted in epoch {run.state.epoch + 1} at step {run.state.step}/"
                        f"{run.steps_per_epoch}; state saved. Resume with: imgcls train --resume {run.run_dir}"
                    )
                row = finish_epoch(run, bar, progress)
                if tracker is None and group.main:
                    tracker = open_tracker(spec.log_to, run.run_dir, log)
                    tracker.start(run.meta["recipe"], run.info)
                if tracker is not None:
                    tracker.epoch(row)
                if on_epoch_end is not None:
                    on_epoch_end(dict(row))
                if spec.early_stopping and run.state.bad_epochs >= spec.early_stopping.patience:
                    log(f"early stop: {run.monitor} has not improved for {run.state.bad_epochs} epochs")
                    stopped_early = True
                    break
        except BaseException:
            if not run.saved:  # a run that never started leaves nothing behind
                ck.remove_unstarted_run(run.run_dir, run.created, run.written)
            raise
        finally:
            bar.close()
            if tracker is not None:
                best_file = run.run_dir / ck.BEST if run.state.best_epoch else None
                tracker.finish(best_file, completed=run.state.epoch >= spec.epochs or stopped_early)
            if run.state.history and run.saved and group.main:
                plot_curves(run.run_dir, run.state.history)
    return _finish(run, stopped_early)


def finish_epoch(run: Run, bar: Progress, progress: bool) -> dict:
    """Validate, pick the best, write checkpoints and metrics.csv; the epoch's row."""
    row = epoch_row(run)
    record_epoch(run, row)
    if run.group.main:
        write_metrics(run.run_dir, run.state.history)
    bar.end_epoch(row, run.spec.epochs)
    if not progress:
        run.log(epoch_line(row, run.spec.epochs))
    return row


def _finish(run: Run, stopped_early: bool) -> TrainResult:
    """The run's result; rank 0 also writes its report.html (a failure there
    is a warning, not a failed run)."""
    state = run.state
    best = state.history[state.best_epoch - 1] if state.best_epoch else {}
    if run.group.main:
        try:
            from imgcls.report import write_report

            write_report(run.run_dir)
        except Exception as exc:
            run.log(f"warning: could not write {run.run_dir / 'report.html'}: {exc}")
    return TrainResult(run.run_dir, state.history, state.best_epoch, best, stopped_early)
