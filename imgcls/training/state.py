"""A run's state: what prepare made (:class:`Run`), what a resume needs
(:class:`State`), and the last checkpoint with its resume state.

``last.safetensors`` and ``resume.pt`` are written together by
:func:`save_last`; :func:`load_resume_state` reads them back.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imgcls import checkpoint as ck
from imgcls import distributed
from imgcls.errors import CheckpointError
from imgcls.models.state import load_weights
from imgcls.recipe import Recipe, recipe_from_dict
from imgcls.training.outputs import TIMINGS
from imgcls.training.schedule import EMA

if TYPE_CHECKING:
    from imgcls.data.prepare import PreparedData

Log = Callable[[str], None]


@dataclass
class State:
    """Everything a resumed run needs beyond the weights: plain values only."""

    epoch: int = 0  # epoch in progress (0-based)
    step: int = 0  # next step within that epoch
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    generation: int = 0  # saves of last.safetensors + resume.pt so far: the pair's number, in both
    history: list[dict] = field(default_factory=list)
    sums: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0})


def is_better(value: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if monitor.endswith("loss") else value > best + min_delta


@dataclass
class Run:
    """A prepared run: the model, its optimizer, the data, and where it writes."""

    recipe: Recipe
    device: torch.device
    dtype: torch.dtype
    channels_last: bool
    data: PreparedData  # train/val uint8 tensors, classes, mean, std
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    penalties: list
    ema: EMA | None
    meta: dict  # what every checkpoint carries
    state: State
    run_dir: Path
    augment: Callable | None
    mix: Callable | None
    batch_size: int
    steps_per_epoch: int
    log: Log
    created: bool = False  # this run made run_dir (a failed start may remove it)
    written: list[str] = field(default_factory=list)  # files a failed start removes
    saved: bool = False  # a checkpoint was written: the run has started
    info: dict = field(default_factory=dict)  # run.json: device, precision, channels_last, torch
    started: float = 0.0  # time.perf_counter() when the run would have started had it never stopped
    batches: Any = None  # the source of training batches (imgcls.data.batches.open_batches)
    forward: Any = None  # model (or its DDP wrapper), or torch.compile of it with train.compile
    compile_pending: bool = False  # the first step compiles: timed apart from throughput
    lr: float = 0.0  # the learning rate of the epoch's last step
    task: str = "single"  # or "multilabel" (imgcls.data.sources: multi-hot targets, sigmoid outputs)
    loss: Any = None  # (logits, target) -> loss: make_loss
    group: distributed.Group = distributed.SINGLE  # ranks: rank 0 alone writes files
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper of model (several processes)
    ddp_trains: tuple = ()  # requires_grad of each parameter when ddp was built (ddp.distribute)
    accumulation: int = 1  # micro-batches per optimizer step (train.gradient_accumulation)
    teacher: Any = None  # train.distill: imgcls.training.distill.Teacher

    @property
    def spec(self):
        return self.recipe.train

    @property
    def monitor(self) -> str:
        if not len(self.data.val.y):
            return "train_loss"
        if self.spec.early_stopping:
            return self.spec.early_stopping.monitor
        return "val_f1" if self.task == "multilabel" else "val_acc"

    def eval_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model


def resumable_meta(recipe: Recipe, resume: Path | None) -> dict | None:
    if resume is None:
        return None
    if not (resume / ck.LAST).exists():
        raise CheckpointError(f"{resume}: no {ck.LAST}; this run cannot be resumed")
    saved_meta = ck.read_meta(resume / ck.LAST)
    saved = recipe_from_dict(saved_meta["recipe"], f"{resume}/{ck.LAST} (recipe)")
    # the starting weights' path is stored absolute; a resume does not read them
    if saved.model.model_copy(update={"weights": None}) != recipe.model.model_copy(update={"weights": None}):
        raise CheckpointError(
            f"{resume}: the recipe's model differs from the run's; resume refuses to change the architecture"
        )
    return saved_meta


def load_resume_state(resume: Path, model, optimizer, ema, scaler) -> State:
    from safetensors.torch import load_file

    saved = ck.load_resume(resume / ck.RESUME)
    ck.check_pair(resume, saved["state"].get("generation"))  # the weights of the same save
    try:
        load_weights(model, load_file(str(resume / ck.LAST)))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{resume}: the run's weights do not fit this recipe's model (input size or classes changed?): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    optimizer.load_state_dict(saved["optimizer"])
    if (ema is not None) != bool(saved.get("ema")):
        raise CheckpointError(
            f"{resume}: train.ema differs from the run's; resume cannot switch EMA on or off"
        )
    if ema is not None:
        ema.model.load_state_dict(saved["ema"])
        ema.updates = saved.get("ema_updates")  # absent: saved before the warm-up, which it keeps without
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    return State(**saved["state"])


def record_epoch(run: Run, row: dict) -> None:
    """The epoch is done: its row joins the history, the best checkpoint is
    replaced when the monitored value improved, and the last pair is written."""
    spec, state = run.spec, run.state
    row["elapsed"] = round(time.perf_counter() - run.started, 3)  # validated, not yet saved
    state.history.append(row)
    state.epoch, state.step = state.epoch + 1, 0
    state.sums = State().sums
    value = row[run.monitor]
    min_delta = spec.early_stopping.min_delta if spec.early_stopping else 0.0
    weight_row = {k: v for k, v in row.items() if k not in TIMINGS}
    if is_better(value, state.best, run.monitor, min_delta):
        state.best, state.best_epoch, state.bad_epochs = value, row["epoch"], 0
        if run.group.main:
            meta = {**run.meta, "epoch": row["epoch"], "metrics": weight_row}
            ck.save_checkpoint(run.run_dir / ck.BEST, run.eval_model(), meta)
    else:
        state.bad_epochs += 1
    save_last(run)


def save_last(run: Run) -> None:
    state = run.state
    state.generation += 1
    if not run.group.main:
        run.saved = True
        return
    ck.save_pair(
        run.run_dir,
        run.model,
        {**run.meta, "epoch": state.epoch, "step": state.step, "generation": state.generation},
        {
            "optimizer": run.optimizer.state_dict(),
            "ema": run.ema.model.state_dict() if run.ema else {},
            "ema_updates": run.ema.updates if run.ema else None,
            "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else {},
            "state": state.__dict__,
        },
    )
    run.saved = True
