"""One epoch of training: batch, augment, forward, loss, backward, optimizer step.

Randomness is a function of (seed, epoch, step): the shuffle order of an
epoch and the augmentation / dropout draws of a step are seeded from those
numbers, never from history. So a run resumed at any step continues with
exactly the draws the uninterrupted run would have made, and
``deterministic: true`` runs give bit-identical weights. Nothing in a step
reads a device tensor back to the host: the sums stay on the device.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
from torch import nn

from imgcls import distributed
from imgcls.data.batches import epoch_order
from imgcls.errors import Diverged
from imgcls.forward import main_logits, model_input
from imgcls.imbalance import balanced_order
from imgcls.models import finetune
from imgcls.training.outputs import write_run_info
from imgcls.training.progress import Progress
from imgcls.training.schedule import lr_at
from imgcls.training.state import Run, State, save_last


def diverged(what: str, epoch: int, step: int | None = None, steps: int = 0) -> Diverged:
    where = (
        f"at epoch {epoch + 1}, step {step + 1}/{steps}" if step is not None else f"after epoch {epoch + 1}"
    )
    return Diverged(
        f"{what} {where}; stopped, nothing of it saved. "
        "Lower train.optimizer.lr, set train.grad_clip, or use train.precision: fp32"
    )


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


def train_one_epoch(
    run: Run, bar: Progress, interrupted: dict, steps_left: int | None
) -> tuple[bool, int | None]:
    """Steps from ``run.state.step`` to the end of the epoch: batch, augment,
    forward, loss, backward, optimizer step. Returns (finished, steps_left);
    not finished means Ctrl-C (or ``steps_left`` ran out): the state is saved."""
    spec, state, model, optimizer, device = run.spec, run.state, run.model, run.optimizer, run.device
    epoch, steps = state.epoch, run.steps_per_epoch
    total_steps = steps * spec.epochs
    finetune.set_frozen(model, finetune.frozen_at(model, run.recipe, epoch))  # train.unfreeze_at
    model.train()
    finetune.hold_frozen_norms(model)  # frozen batch norms keep their statistics
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
            state.sums = {
                **_global_sums(group, sums),
                "seconds": state.sums["seconds"] + time.perf_counter() - started,
            }
            save_last(run)
            return False, steps_left
    check_finite(steps - 1)
    state.sums = {
        **_global_sums(group, sums),
        "seconds": state.sums["seconds"] + time.perf_counter() - started,
    }
    run.lr = lr
    return True, steps_left


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
        return balanced_order(run.data.train.y, len(run.data.classes), gen)
    # a plain shuffle, or for sets larger than a window, chunk-wise (disk streaming reads sequentially)
    return epoch_order(len(run.data.train.y), run.data.train.x[0].numel(), gen)


def finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


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
