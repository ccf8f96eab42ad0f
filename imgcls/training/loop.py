"""The training loop: the run, its epochs, and each step of an epoch.

The whole run on one page, as a reader would tell it::

    run = prepare(recipe)                      # setup: device, data, model, optimizer, run folder
    while epochs are left:
        train_one_epoch(run)                   # loop: batch -> augment -> forward -> loss -> step
        row = epoch_row(run)                   # validation
        record_epoch(run, row)                 # state: best.safetensors, last + resume.pt
        write_metrics(run.run_dir, history)    # outputs: metrics.csv (curves and report at the end)

Ctrl-C stops after the running step with the state saved (a second one
aborts); ``imgcls train --resume RUN`` continues exactly there.

Randomness is a function of (seed, epoch, step): the shuffle order of an
epoch and the augmentation / dropout draws of a step are seeded from those
numbers, never from history. So a run resumed at any step continues with
exactly the draws the uninterrupted run would have made, and
``deterministic: true`` runs give bit-identical weights. Nothing in a step
reads a device tensor back to the host: the sums stay on the device.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgcls import checkpoint as ck
from imgcls import distributed, interrupts
from imgcls.data.batches import epoch_order
from imgcls.errors import Interrupted
from imgcls.forward import main_logits, model_input
from imgcls.models import finetune
from imgcls.recipe import Recipe
from imgcls.tracking import open_tracker
from imgcls.training.ddp import compiled, distribute
from imgcls.training.outputs import elapsed, write_metrics, write_run_info
from imgcls.training.outputs import plot_curves as _plot
from imgcls.training.progress import Progress as _Progress
from imgcls.training.progress import epoch_line
from imgcls.training.schedule import lr_at
from imgcls.training.setup import prepare
from imgcls.training.state import Log, Run, State, record_epoch, save_last
from imgcls.training.validation import calibrate, diverged, epoch_row, finite


class EpochSums:
    """Loss and accuracy sums kept on the device: read back once per epoch (and
    by the progress bar a few times a second), never per step. The first step
    whose loss is not finite is recorded on the device too (torch.where)."""

    def __init__(self, sums: dict, device: torch.device):
        wide = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
        self.loss = torch.tensor(sums["loss"], dtype=wide, device=device)
        self.correct = torch.tensor(sums["correct"], dtype=torch.int64, device=device)
        self.seen = sums["seen"]  # batch sizes are known on the host
        self.first_bad = torch.tensor(-1, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, step: int) -> None:
        loss = loss.detach()
        self.loss += loss.to(self.loss.dtype) * len(labels)
        if labels.ndim == 2:  # multi-label: exact match at the 0.5 threshold
            self.correct += ((logits.detach() >= 0) == (labels > 0.5)).all(1).sum()
        else:
            self.correct += (logits.detach().argmax(1) == labels).sum()
        self.seen += len(labels)
        bad = (self.first_bad < 0) & ~torch.isfinite(loss)
        self.first_bad = torch.where(bad, step, self.first_bad)

    def read(self) -> dict:
        return {"loss": float(self.loss), "correct": int(self.correct), "seen": self.seen}

    def bad_step(self) -> int | None:
        step = int(self.first_bad)
        return None if step < 0 else step


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    best_epoch: int
    best: dict
    stopped_early: bool
    calibration: dict | None = None  # what best/last store (imgcls.calibration); rank 0 only


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
            with ck.holding_runs():  # the run folder is held from its start (ck.hold_run) to its end
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
    started = time.perf_counter()
    interrupted = {"flag": False}

    def on_sigint(presses: int) -> None:
        if presses > 1:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        interrupted["flag"] = True
        log("stopping after this step (Ctrl-C again to abort without saving)")

    bar = tracker = None  # train.log_to: opened at the first finished epoch, so a failed start leaves none
    stopped_early = succeeded = False
    steps_left = stop_after_steps
    run = prepare(recipe, base_dir=base_dir, out=out, resume=resume, log=log, group=group)
    try:  # nothing between prepare and here: a run that fails before its first checkpoint leaves nothing
        run.started = started - elapsed(run.state.history)  # wall time counts on across a resume
        spec = run.spec
        bar = _Progress(progress, spec.epochs, run.steps_per_epoch)
        with interrupts.handled(on_sigint):
            interrupts.check()  # one swallowed before the handler above took over
            while run.state.epoch < spec.epochs:
                finished, steps_left = train_one_epoch(run, bar, interrupted, steps_left)
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
        succeeded = True  # the last checkpoint is written: the run has succeeded
    except BaseException:
        if not run.saved:  # a run that never started leaves nothing behind
            ck.remove_unstarted_run(run.run_dir, run.created, run.written)
            if group.main:
                distributed.forget_run_dir(recipe)
        raise
    finally:
        if bar is not None:
            bar.close()
        if tracker is not None:
            best_file = run.run_dir / ck.BEST if run.state.best_epoch else None
            tracker.finish(best_file, completed=run.state.epoch >= run.spec.epochs or stopped_early)
        if run.state.history and run.saved and group.main and not succeeded:
            _plot(run.run_dir, run.state.history)
    return _finish(run, stopped_early)


def finish_epoch(run: Run, bar: _Progress, progress: bool) -> dict:
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
    """The run's result; rank 0 also draws its curves and writes its report.html
    (a failure there is a warning, not a failed run; a Ctrl-C skips them: the
    run is done and saved)."""
    state = run.state
    best = state.history[state.best_epoch - 1] if state.best_epoch else {}
    calibrated = None
    if run.group.main:
        try:
            calibrated = _calibrate(run)
            if state.history:
                _plot(run.run_dir, state.history)
            try:
                from imgcls.report import write_report

                write_report(run.run_dir)
            except Exception as exc:
                run.log(f"warning: could not write {run.run_dir / 'report.html'}: {exc}")
        except KeyboardInterrupt:
            run.log(
                f"Ctrl-C: the run had finished and is saved; its curves and report were skipped "
                f"(imgcls report {run.run_dir} writes the report)"
            )
    return TrainResult(run.run_dir, state.history, state.best_epoch, best, stopped_early, calibrated)


def _calibrate(run: Run) -> dict | None:
    """The temperature of the kept weights, stored in best and last (a failure
    is a warning: the run is saved, and ``imgcls calibrate`` fits it later)."""
    try:
        return calibrate(run)
    except KeyboardInterrupt:
        run.log(f"Ctrl-C: the temperature was not fitted (imgcls calibrate {run.run_dir} fits it)")
        raise
    except Exception as exc:
        run.log(f"warning: could not calibrate ({exc}); imgcls calibrate {run.run_dir} fits it")
        return None


def train_one_epoch(
    run: Run, bar: _Progress, interrupted: dict, steps_left: int | None
) -> tuple[bool, int | None]:
    """Steps from ``run.state.step`` to the end of the epoch: batch, augment,
    forward, loss, backward, optimizer step. Returns (finished, steps_left);
    not finished means Ctrl-C (or ``steps_left`` ran out): the state is saved."""
    spec, state, model, optimizer, device = run.spec, run.state, run.model, run.optimizer, run.device
    epoch, steps = state.epoch, run.steps_per_epoch
    total_steps = steps * spec.epochs
    _begin_epoch(run, epoch)
    perm = _epoch_order(run, epoch)
    # the sums of a resumed epoch are global: rank 0 carries them, the others add theirs
    sums = EpochSums(state.sums if run.group.main else State().sums, device)
    group = run.group

    def check_finite(last_step: int) -> None:
        bad = sums.bad_step()
        if bad is not None:
            raise diverged("the training loss became NaN or infinite", epoch, bad, steps)
        if not finite(model.parameters()):
            raise diverged("the weights became NaN or infinite", epoch, last_step, steps)

    bar.start_epoch(epoch, state.step, lambda: _live_stats(sums))
    started = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    for step in range(state.step, steps):
        lr = lr_at(epoch * steps + step, total_steps, steps, spec.optimizer.lr, spec.schedule)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr * param_group.get("lr_scale", 1.0)  # layer_decay / head_lr
        distributed.maybe_die(group, epoch * steps + step)
        # the global batch is the one-process batch, this rank takes its slice
        rows = group.shard(perm[step * run.batch_size : (step + 1) * run.batch_size])
        optimizer.zero_grad(set_to_none=True)
        for micro, idx in enumerate(rows.chunk(run.accumulation)):
            loss, logits, labels = _forward_backward(run, idx, epoch, step, micro)
            if micro < run.accumulation - 1:
                sums.add(loss, logits, labels, step)
        if spec.grad_clip:
            run.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        run.scaler.step(optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(model)
        if run.compile_pending:
            started += _compile_done(run, started)

        sums.add(loss, logits, labels, step)
        state.step = step + 1
        if steps_left is not None:
            steps_left -= 1
        if bar.advance():
            check_finite(step)  # the bar read the device anyway: a free check
        # every rank stops at the same step (one host-side flag exchange per step)
        if group.any(interrupted["flag"]) or steps_left == 0:
            check_finite(step)  # never save weights after a non-finite step
            _keep_sums(run, sums, started)
            save_last(run)
            return False, steps_left
    check_finite(steps - 1)
    _keep_sums(run, sums, started)
    run.lr = lr
    return True, steps_left


def _begin_epoch(run: Run, epoch: int) -> None:
    """What trains this epoch (train.unfreeze_at), DDP over exactly that, train mode."""
    model = run.model
    finetune.set_frozen(model, finetune.frozen_at(model, run.recipe, epoch))
    if distribute(run):  # what trains changed: DDP must average it all
        run.forward = compiled(run)
    model.train()
    finetune.hold_frozen_norms(model)  # frozen batch norms keep their statistics


def _keep_sums(run: Run, sums: EpochSums, started: float) -> None:
    """The epoch's sums so far, over all ranks, into the state (what a resume carries)."""
    state = run.state
    state.sums = {
        **_global_sums(run.group, sums),
        "seconds": state.sums["seconds"] + time.perf_counter() - started,
    }


def _forward_backward(
    run: Run, idx: torch.Tensor, epoch: int, step: int, micro: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One micro-batch: fetch, augment, forward, loss, backward. Returns the
    loss, the logits and the labels the accuracy is counted on (all on the device)."""
    spec, device, accumulation = run.spec, run.device, run.accumulation
    net: Any = run.forward or run.model  # the DDP wrapper has no_sync()
    xb, yb = run.batches.batch(idx)  # uint8 and labels, on the device
    # randomness from (seed, epoch, step) alone: a resumed run draws the same
    gen = torch.Generator().manual_seed(_draw_seed(spec.seed, epoch, step, run.group.rank, micro))
    _seed_global_rng(_draw_seed(spec.seed, epoch, step, run.group.rank, micro, 1), device)  # dropout etc.
    if run.augment is not None:
        xb = run.augment(xb, gen)
    xb = model_input(xb, run.data.mean, run.data.std, device=device, channels_last=run.channels_last)
    target = yb
    if run.mix is not None:
        xb, target = run.mix(xb, yb, gen)
    # DDP averages gradients once per optimizer step, on the last micro-batch
    sync = run.ddp is None or micro == accumulation - 1
    with contextlib.nullcontext() if sync else net.no_sync():
        with torch.autocast(device.type, dtype=run.dtype, enabled=run.dtype != torch.float32):
            logits = main_logits(net(xb))
            loss = run.loss(logits.float(), target)
            if run.teacher is not None:  # train.distill: the teacher's term joins the usual loss
                loss = run.teacher.loss(logits.float(), loss, idx, xb)
        if run.penalties:
            loss = loss + sum(a * w.abs().sum() + b * w.pow(2).sum() for w, a, b in run.penalties)
        # fp16 only: loss scaling against underflow; / K: the mean over the whole step
        run.scaler.scale(loss / accumulation if accumulation > 1 else loss).backward()
    return loss, logits, yb if target.ndim == 1 or yb.ndim == 2 else target.argmax(1)


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


def _seed_global_rng(seed: int, device: torch.device) -> None:
    """What dropout and the like draw from, seeded for one step: the CPU's
    generator and the run device's. Not ``torch.manual_seed``: that seeds
    every CUDA device too, and while CUDA is not initialised (any CPU run) it
    queues that call with a formatted stack trace, ~0.8 ms a step."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # this rank's device, initialised by now
    elif device.type == "mps":
        torch.mps.manual_seed(seed)


def _draw_seed(seed: int, epoch: int, step: int, rank: int, micro: int, *more: int) -> int:
    """The seed of a (rank, micro-batch)'s draws; rank 0's first micro-batch
    draws what a one-process run without accumulation draws."""
    if rank == 0 and micro == 0:
        return _seed(seed, epoch, step, *more)
    return _seed(seed, epoch, step, *more, 2 + rank, micro)


def _global_sums(group: distributed.Group, sums: EpochSums) -> dict:
    """The epoch's loss / correct / seen over all ranks (one reduction per epoch)."""
    now = sums.read()
    if not group.active:
        return now
    total = group.sum_host([now["loss"], now["correct"], now["seen"]])
    return {"loss": total[0], "correct": int(total[1]), "seen": int(total[2])}


def _epoch_order(run: Run, epoch: int) -> torch.Tensor:
    """The epoch's image order from (seed, epoch): a shuffle, or balanced classes."""
    gen = torch.Generator().manual_seed(_seed(run.spec.seed, epoch))
    if run.recipe.data.sampler == "balanced":
        from imgcls.imbalance import balanced_order

        return balanced_order(run.data.train.y, len(run.data.classes), gen)
    # a plain shuffle, or for sets larger than a window, chunk-wise (disk streaming reads sequentially)
    return epoch_order(len(run.data.train.y), run.data.train.x[0].numel(), gen)


def _live_stats(sums: EpochSums) -> tuple[float, float, int]:
    now = sums.read()
    return now["loss"] / max(now["seen"], 1), now["correct"] / max(now["seen"], 1), now["seen"]


def _compile_done(run: Run, started: float) -> float:
    """After the first compiled step: its time (compiling, mostly) is logged,
    recorded in run.json as ``compile_s`` and returned, to be left out of the
    epoch's throughput."""
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)  # once per run, not per step
    seconds = time.perf_counter() - started
    run.compile_pending = False
    run.info["compile_s"] = round(seconds, 2)
    run.log(f"compile: {seconds:.1f} s (first step; not counted in img/s)")
    write_run_info(run.run_dir, run.info)
    return seconds
