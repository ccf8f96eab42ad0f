"""The training loop: one plain function from batch to optimizer step.

Randomness is a function of (seed, epoch, step): the shuffle order of an
epoch and the augmentation / dropout draws of a step are seeded from those
numbers, never from history. So a run resumed at any step continues with
exactly the draws the uninterrupted run would have made, and
``deterministic: true`` runs give bit-identical weights.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from imgcls import __version__, distributed, interrupts
from imgcls import checkpoint as ck
from imgcls.data.batches import epoch_order
from imgcls.errors import CheckpointError, Diverged, Interrupted, RecipeError, UsageError
from imgcls.infer import main_logits, model_input, tensor_logits
from imgcls.models import finetune
from imgcls.models.build import build_model
from imgcls.recipe import Recipe, dump_yaml, recipe_from_dict, recipe_to_dict
from imgcls.tracking import check_trackers, open_tracker

Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- devices


def choose_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' asked for, but torch sees no CUDA GPU (use --device cpu or auto)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError("device 'mps' asked for, but this machine has no MPS (use --device cpu or auto)")
    return torch.device(name)


def choose_channels_last(value: str | bool, device: torch.device) -> bool:
    """``auto``: on for CPU and CUDA, off for MPS.

    CPU, measured with bench/train_throughput.py --precision (fp32, hand
    loop): channels_last/contiguous 1.32x quickstart, 1.43x resnet-style,
    1.46x mobilenet-style (oneDNN convs are NHWC inside). CUDA: tensor-core
    convolutions want NHWC. MPS: not measured, so left off.
    """
    if value == "auto":
        return device.type in ("cpu", "cuda")
    return bool(value)


# --------------------------------------------------------------------------- optimisation


def make_optimizer(model: nn.Module, spec) -> torch.optim.Optimizer:
    """Weight decay applies to weights (ndim > 1), not to biases or norm scales;
    per-stage lr scales and frozen parameters: imgcls.models.finetune.param_groups."""
    groups = finetune.param_groups(model, spec)
    if spec.name == "sgd":
        return torch.optim.SGD(groups, lr=spec.lr, momentum=spec.momentum, nesterov=spec.nesterov)
    if spec.name == "adam":
        return torch.optim.Adam(groups, lr=spec.lr, betas=spec.betas)
    if spec.name == "adamw":
        return torch.optim.AdamW(groups, lr=spec.lr, betas=spec.betas)
    return torch.optim.RMSprop(groups, lr=spec.lr, momentum=spec.momentum)


def lr_at(step: int, total: int, steps_per_epoch: int, base_lr: float, spec) -> float:
    """Learning rate at a global step: warmup, then the schedule. A pure function,
    so resuming needs no scheduler state."""
    warmup = int(spec.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    if spec.name == "constant":
        return base_lr
    if spec.name == "step":
        return base_lr * spec.gamma ** (step // (spec.step_size * steps_per_epoch))
    t = (step - warmup) / max(total - warmup, 1)
    if spec.name == "cosine":
        return spec.min_lr + (base_lr - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    # onecycle: linear up for 30% to max_lr, cosine down to max_lr / 1e4
    peak = spec.max_lr or base_lr
    start, end, up = peak / 25, peak / 1e4, 0.3
    if t < up:
        return start + (peak - start) * t / up
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - up) / (1 - up)))


def regularized_weights(model: nn.Module, l1: float, l2: float) -> list[tuple[torch.Tensor, float, float]]:
    """(weight, l1, l2) for every weight the recipe regularises (Keras semantics:
    loss += l1 * sum|w| + l2 * sum w^2). Layer tags win over the global value."""
    out = []
    for module in model.modules():
        tag = getattr(module, "imgcls_regularization", None)
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
            continue
        # recipe stacks tag every weight they regularise (0, 0 opts out);
        # named architectures have no tags and take the global values
        a, b = tag if tag is not None else (l1, l2)
        if a or b:
            out.append((weight, a, b))
    return out


def _seed(*parts: int) -> int:
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class EMA:
    """Exponential moving average of the weights (buffers copied), warmed up:
    update ``n`` (0-based) averages with ``min(decay, (1 + n) / (10 + n))``
    (TensorFlow's ExponentialMovingAverage with num_updates), so a run of a few
    hundred steps at 0.999 does not stay at its random initialisation."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.updates: int | None = 0  # in resume.pt; None: a run saved before the warm-up (fixed decay)
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.decay
        if self.updates is not None:
            decay = min(decay, (1 + self.updates) / (10 + self.updates))
            self.updates += 1
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values(), strict=False):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - decay)
            else:
                e.copy_(m)


# --------------------------------------------------------------------------- the run


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


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    best_epoch: int
    best: dict
    stopped_early: bool


# in metrics.csv, never in a weight file (bit-identical runs). seconds: the epoch's training
# steps (img_per_s's time); elapsed: wall time since the run started (data preparation,
# validation and checkpoints included; a resumed run goes on from its last epoch's)
TIMINGS = ("seconds", "img_per_s", "elapsed")


def _is_better(value: float, best: float | None, monitor: str, min_delta: float) -> bool:
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
    data: object  # imgcls.data.Prepared: train/val uint8 tensors, classes, mean, std
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
    batches: object = None  # imgcls.data.batches source of training batches
    forward: Callable | None = None  # model, or torch.compile(model) with train.compile
    compile_pending: bool = False  # the first step compiles: timed apart from throughput
    lr: float = 0.0  # the learning rate of the epoch's last step
    task: str = "single"  # or "multilabel" (imgcls.data.sources: multi-hot targets, sigmoid outputs)
    loss: Callable | None = None  # (logits, target) -> loss: make_loss
    group: distributed.Group = distributed.SINGLE  # ranks: rank 0 alone writes files
    ddp: nn.Module | None = None  # the DistributedDataParallel wrapper of model (several processes)
    ddp_trains: tuple = ()  # requires_grad of each parameter when ddp was built (_distribute)
    accumulation: int = 1  # micro-batches per optimizer step (train.gradient_accumulation)

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
    started = time.perf_counter()
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        interrupted["flag"] = True
        log("stopping after this step (Ctrl-C again to abort without saving)")

    previous_handler = bar = None
    stopped_early = finished = False
    tracker = None  # train.log_to: opened at the first finished epoch, so a failed start leaves none
    steps_left = stop_after_steps
    run = prepare(recipe, base_dir=base_dir, out=out, resume=resume, log=log, group=group)
    try:  # nothing between prepare and here: a run that fails before its first checkpoint leaves nothing
        run.started = started - _elapsed(run.state.history)  # wall time counts on across a resume
        spec = run.spec
        bar = _Progress(progress, spec.epochs, run.steps_per_epoch)
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            previous_handler = signal.signal(signal.SIGINT, on_sigint)
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
        finished = True  # the last checkpoint is written: the run has succeeded
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
            tracker.finish(best_file, completed=run.state.epoch >= spec.epochs or stopped_early)
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if run.state.history and run.saved and group.main and not finished:
            _plot(run.run_dir, run.state.history)
    state = run.state
    best = state.history[state.best_epoch - 1] if state.best_epoch else {}
    if not group.main:
        return TrainResult(run.run_dir, state.history, state.best_epoch, best, stopped_early)
    try:  # a Ctrl-C now skips what follows: the run is done and saved
        if state.history:
            _plot(run.run_dir, state.history)
        # the run's report.html (imgcls.report): a failure is a warning, not a failed run
        try:
            from imgcls.report import write_report

            write_report(run.run_dir)
        except Exception as exc:
            log(f"warning: could not write {run.run_dir / 'report.html'}: {exc}")
    except KeyboardInterrupt:
        log(
            f"Ctrl-C: the run had finished and is saved; its curves and report were skipped "
            f"(imgcls report {run.run_dir} writes the report)"
        )
    return TrainResult(run.run_dir, state.history, state.best_epoch, best, stopped_early)


# --------------------------------------------------------------------------- prepare


def prepare(
    recipe: Recipe,
    *,
    base_dir: Path,
    out: Path | None,
    resume: Path | None,
    log: Log,
    group: distributed.Group = distributed.SINGLE,
) -> Run:
    """Devices, data, model, optimizer, and (last, once all of that worked) the run folder."""
    spec = recipe.train
    distributed.per_rank_batch(spec.batch_size, group.world)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    device = choose_device(spec.device)
    if group.active and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)  # one GPU per process
    channels_last = choose_channels_last(spec.channels_last, device)
    check_trackers(spec.log_to)  # a missing extra fails before any work

    if out is not None and resume is None and group.main:
        ck.check_out_dir(out)  # a usage error before minutes of decoding, not after
    if resume is not None and group.main:  # before any rank reads the pair
        ck.repair_pair(resume, log)
    saved_meta = _resumable_meta(recipe, resume)
    # rank 0 decodes (and fills the persistent cache); the others then read it
    data = _prepare_data(recipe, base_dir, saved_meta, log) if group.main else None
    group.barrier()
    if data is None:
        data = _prepare_data(recipe, base_dir, saved_meta, log)
    classes = data.classes
    if saved_meta is not None and saved_meta["classes"] != classes:
        raise CheckpointError(
            f"{resume}: the data's classes {classes} differ from the run's {saved_meta['classes']}; resume refuses"
        )
    if recipe.model.num_classes is not None and recipe.model.num_classes != len(classes):
        raise RecipeError(
            f"model.num_classes is {recipe.model.num_classes} but the data has {len(classes)} classes"
        )
    input_shape = recipe.input_shape()
    if tuple(data.train.x.shape[1:]) != tuple(input_shape):
        raise RecipeError(
            f"model.input_shape {input_shape} differs from the data's "
            f"{tuple(data.train.x.shape[1:])} (data.channels, data.image_size)"
        )

    torch.manual_seed(spec.seed)
    model = build_model(_model_spec(recipe, base_dir, resume), input_shape, len(classes), log=log).to(device)
    finetune.set_frozen(model, finetune.frozen_at(model, recipe, 0))  # before the summary: shown frozen
    if line := finetune.freeze_line(model, recipe):
        log(line)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if group.active and spec.sync_batchnorm:
        if device.type != "cuda":
            raise RecipeError(
                "train.sync_batchnorm needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernel)"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    choice = _precision(
        spec,
        device,
        model,
        input_shape,
        len(classes),
        len(data.train.y),
        channels_last,
        resume,
        log,
        distributed_run=group.active,
    )
    dtype = choice.dtype
    optimizer = make_optimizer(model, spec.optimizer)
    ema = EMA(model, spec.ema.decay) if spec.ema else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    # the resolved recipe: data.path made absolute so evaluate finds the data from anywhere
    resolved = recipe_to_dict(recipe)
    if recipe.data.path:
        from imgcls.data.sources import resolve

        resolved["data"]["path"] = str(resolve(recipe.data.path, base_dir).resolve())
    if recipe.model.weights and resume is None:
        resolved["model"]["weights"] = _model_spec(recipe, base_dir, None).weights
    resolved_recipe = recipe_from_dict(resolved)
    meta = {
        "recipe": resolved,
        "classes": classes,
        "input_shape": list(input_shape),
        "preprocessing": {
            "image_size": list(recipe.data.size),
            "channels": recipe.data.channels,
            "mean": [float(m) for m in data.mean],
            "std": [float(s) for s in data.std],
            "resize": recipe.data.resize,
        },
        "imgcls_version": __version__,
    }
    state = State()
    if resume is not None:
        state = _load_resume_state(resume, model, optimizer, ema, scaler)

    from imgcls.imbalance import class_counts, class_weights, count_lines

    task = _task(recipe, data, log)
    counts = class_counts(data.train.y, len(classes))
    untreated = spec.class_weights == "none" and recipe.data.sampler == "shuffle"
    for line in count_lines("train", classes, counts, hint=untreated):
        log(line)
    weights = class_weights(spec.class_weights, classes, counts)
    n = len(data.train.y)
    batch_size = min(spec.batch_size, n)
    if group.active or spec.gradient_accumulation > 1:
        batch_size = spec.batch_size * spec.gradient_accumulation  # one optimizer step, all ranks
        if batch_size > n:
            raise RecipeError(
                f"train.batch_size x gradient_accumulation is {batch_size}, more than the {n} training images"
            )
    augment, mix = _augmentation(recipe, len(classes))
    if task == "multilabel":
        meta["task"] = "multilabel"  # absent means single-label: older checkpoints stay as they were
    run = Run(
        recipe=recipe,
        device=device,
        dtype=dtype,
        channels_last=channels_last,
        data=data,
        model=model,
        optimizer=optimizer,
        scaler=scaler,
        penalties=regularized_weights(model, recipe.model.l1, recipe.model.l2),
        ema=ema,
        meta=meta,
        state=state,
        run_dir=resume if resume is not None else Path(),
        augment=augment,
        mix=mix,
        batch_size=batch_size,
        steps_per_epoch=max(n // batch_size, 1),  # drop the ragged last batch (BatchNorm)
        log=log,
        saved=resume is not None,
        task=task,
        loss=make_loss(task, spec, data.train.y, device, weights),
        group=group,
        accumulation=spec.gradient_accumulation,
    )
    finetune.set_frozen(model, finetune.frozen_at(model, recipe, state.epoch))  # a resume past unfreeze_at
    _distribute(run)
    run.batches, run.forward = _batch_source(run), _compiled(run)
    interrupts.check()  # a Ctrl-C swallowed while the data was prepared stops us here
    # only now, with data and model ready, does the run get a folder (rank 0 makes it)
    if resume is not None and group.main:
        # the resumed recipe may extend epochs etc.: the folder describes what runs now
        ck.write_text_atomic(resume / "recipe.yaml", dump_yaml(resolved_recipe))
        log(f"resuming {resume} at epoch {state.epoch + 1}, step {state.step}")
    elif group.main:
        if out is not None:
            run.created, run.run_dir = ck.claim_out_dir(out), out
        else:
            run.created, run.run_dir = True, ck.new_run_dir(Path(spec.out), recipe.name)
        try:
            run.written += ["recipe.yaml", "summary.txt", "summary.json"]
            ck.write_text_atomic(run.run_dir / "recipe.yaml", dump_yaml(resolved_recipe))
            _write_summary(run.run_dir, model, input_shape)
            log(f"run folder: {run.run_dir}")
        except BaseException:
            ck.remove_unstarted_run(run.run_dir, run.created, run.written)
            raise
    try:  # from here a failure (a broken group, an unwritable run.json, Ctrl-C) removes what the start wrote
        if group.main and out is None and resume is None:  # a given folder needs no record
            distributed.record_run_dir(recipe, run.run_dir)
        run.run_dir = group.broadcast(run.run_dir)
        if not len(data.val.y):
            log("no validation split: the best checkpoint is chosen on training loss")
        precision_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        log(f"device: {device.type}, {precision_name}{', channels_last' if channels_last else ''}")
        run.info = {"device": device.type, "precision": precision_name, "channels_last": channels_last}
        run.info.update(precision_choice=choice.info(), compile=spec.compile, batches=run.batches.mode)
        if group.active:
            log(f"{group.world} processes, {spec.batch_size // group.world} images each per batch")
            run.info.update(world_size=group.world, sync_batchnorm=spec.sync_batchnorm)
        if spec.gradient_accumulation > 1:
            run.info["gradient_accumulation"] = spec.gradient_accumulation
        if not group.main:
            return run
        if "run.json" not in run.written and not run.saved:
            run.written.append("run.json")
        ck.write_text_atomic(
            run.run_dir / "run.json", json.dumps({**run.info, "torch": torch.__version__}, indent=2)
        )
        return run
    except BaseException:
        if group.main and not run.saved:
            ck.remove_unstarted_run(run.run_dir, run.created, run.written)
            distributed.forget_run_dir(recipe)
        raise


def _resumable_meta(recipe: Recipe, resume: Path | None) -> dict | None:
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


def _model_spec(recipe: Recipe, base_dir: Path, resume: Path | None):
    """model.weights resolved against the recipe's folder; dropped on resume (last.safetensors follows)."""
    spec = recipe.model
    if spec.weights and resume is not None:
        return spec.model_copy(update={"weights": None})
    if spec.weights:
        from imgcls.data.sources import resolve

        return spec.model_copy(update={"weights": str(resolve(spec.weights, base_dir).resolve())})
    return spec


def _prepare_data(recipe: Recipe, base_dir: Path, saved_meta: dict | None, log: Log):
    from imgcls.data import prepare_data

    data_spec = recipe.data
    if saved_meta is not None:  # a resumed run keeps the statistics it started with
        pre = saved_meta["preprocessing"]
        data_spec = data_spec.model_copy(update={"mean": pre["mean"], "std": pre["std"]})
    elif recipe.model.pretrained and data_spec.mean is None and data_spec.std is None:
        from imgcls.models.zoo import pretrained_stats

        stats = pretrained_stats(recipe.model.arch, data_spec.channels)
        if stats is not None:
            data_spec = data_spec.model_copy(update={"mean": stats[0], "std": stats[1]})
            log(f"normalising with {recipe.model.arch}'s pretraining statistics")
    return prepare_data(data_spec, base_dir, None, log)


def _load_resume_state(resume: Path, model, optimizer, ema, scaler) -> State:
    from safetensors.torch import load_file

    saved = ck.load_resume(resume / ck.RESUME)
    ck.check_pair(resume, saved["state"].get("generation"))  # the weights of the same save
    try:
        ck.load_weights(model, load_file(str(resume / ck.LAST)))
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


def _precision(
    spec, device, model, input_shape, num_classes, n, channels_last, resume, log, distributed_run=False
):
    """``train.precision`` resolved (``auto``: timed per model, see imgcls.precision)."""
    from imgcls import precision

    choice = precision.choose(
        spec.precision,
        device,
        model=model,
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        batch_size=min(spec.batch_size, n),
        channels_last=channels_last,
        deterministic=spec.deterministic or distributed_run,
        run_steps=max(n // min(spec.batch_size, n), 1) * spec.epochs,
        resumed_from=resume,
    )
    log(choice.line())
    return choice


def _distribute(run: Run) -> bool:
    """Several processes: (re)build the DistributedDataParallel wrapper when the set
    of trainable parameters is not the one it was built with (train.unfreeze_at,
    a resume past it). DDP averages the gradients of only the parameters that
    required them when it was built: the others would step on each rank's own
    gradients, and the ranks drift apart. True when (re)built."""
    trains = tuple(p.requires_grad for p in run.model.parameters())
    if not run.group.active or (run.ddp is not None and trains == run.ddp_trains):
        return False
    from torch.nn.parallel import DistributedDataParallel

    model, device = run.model, run.device
    # auxiliary heads (inception, googlenet) get no gradient from the main loss
    aux = any("aux" in name.lower() for name, _ in model.named_children())
    run.ddp = None  # the old wrapper (and its reducer's hooks) goes before the new one is built
    run.ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=aux
    )
    run.ddp_trains = trains
    return True


def _batch_source(run: Run):
    from imgcls.data.batches import describe, open_batches

    train = run.data.train
    source = open_batches(
        train.x, train.y, run.device, max_batch=run.batch_size, file=getattr(train, "file", None)
    )
    run.log(describe(source))
    return source


def _compiled(run: Run) -> Callable:
    """``torch.compile(model)`` with ``train.compile`` (compiled lazily, at the
    first step, whose time is then reported apart: :func:`_compile_done`).
    The weights stay those of ``run.model``: checkpoints are unchanged."""
    net = run.ddp or run.model
    if not run.spec.compile:
        return net
    run.compile_pending = True
    return torch.compile(net)


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
    ck.write_text_atomic(
        run.run_dir / "run.json", json.dumps({**run.info, "torch": torch.__version__}, indent=2)
    )
    return seconds


# --------------------------------------------------------------------------- one epoch


def _diverged(what: str, epoch: int, step: int | None = None, steps: int = 0) -> Diverged:
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
    run: Run, bar: _Progress, interrupted: dict, steps_left: int | None
) -> tuple[bool, int | None]:
    """Steps from ``run.state.step`` to the end of the epoch: batch, augment,
    forward, loss, backward, optimizer step. Returns (finished, steps_left);
    not finished means Ctrl-C (or ``steps_left`` ran out): the state is saved."""
    spec, state, model, optimizer, device = run.spec, run.state, run.model, run.optimizer, run.device
    epoch, steps = state.epoch, run.steps_per_epoch
    forward = run.forward or model
    total_steps = steps * spec.epochs
    finetune.set_frozen(model, finetune.frozen_at(model, run.recipe, epoch))  # train.unfreeze_at
    if _distribute(run):  # what trains changed: DDP must average it all
        forward = run.forward = _compiled(run)
    model.train()
    finetune.hold_frozen_norms(model)  # frozen batch norms keep their statistics
    perm = _epoch_order(run, epoch)
    # the sums of a resumed epoch are global: rank 0 carries them, the others add theirs
    sums = EpochSums(state.sums if run.group.main else State().sums, device)
    net, group, accumulation = forward, run.group, run.accumulation

    def check_finite(last_step: int) -> None:
        bad = sums.bad_step()
        if bad is not None:
            raise _diverged("the training loss became NaN or infinite", epoch, bad, steps)
        if not _finite(model.parameters()):
            raise _diverged("the weights became NaN or infinite", epoch, last_step, steps)

    bar.start_epoch(epoch, state.step, lambda: _live_stats(sums))
    started = time.perf_counter()
    lr = optimizer.param_groups[0]["lr"]
    for step in range(state.step, steps):
        lr = lr_at(epoch * steps + step, total_steps, steps, spec.optimizer.lr, spec.schedule)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr * param_group.get("lr_scale", 1.0)  # layer_decay / head_lr
        distributed.maybe_die(group, epoch * steps + step)
        # randomness from (seed, epoch, step) alone: a resumed run draws the same;
        # the global batch is the one-process batch, this rank takes its slice
        rows = group.shard(perm[step * run.batch_size : (step + 1) * run.batch_size])
        optimizer.zero_grad(set_to_none=True)
        for micro, idx in enumerate(rows.chunk(accumulation)):
            xb, yb = run.batches.batch(idx)  # uint8 and labels, on the device
            gen = torch.Generator().manual_seed(_draw_seed(spec.seed, epoch, step, group.rank, micro))
            _seed_global_rng(_draw_seed(spec.seed, epoch, step, group.rank, micro, 1), device)  # dropout etc.
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
            if micro < accumulation - 1:
                sums.add(loss, logits, yb if target.ndim == 1 or yb.ndim == 2 else target.argmax(1), step)
        if spec.grad_clip:
            run.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        run.scaler.step(optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(model)
        if run.compile_pending:
            started += _compile_done(run, started)

        sums.add(loss, logits, yb if target.ndim == 1 or yb.ndim == 2 else target.argmax(1), step)
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
            _save_last(run)
            return False, steps_left
    check_finite(steps - 1)
    state.sums = {
        **_global_sums(group, sums),
        "seconds": state.sums["seconds"] + time.perf_counter() - started,
    }
    run.lr = lr
    return True, steps_left


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


def _finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def _live_stats(sums: EpochSums) -> tuple[float, float, int]:
    now = sums.read()
    return now["loss"] / max(now["seen"], 1), now["correct"] / max(now["seen"], 1), now["seen"]


# --------------------------------------------------------------------------- finish an epoch


def finish_epoch(run: Run, bar: _Progress, progress: bool) -> dict:
    """Validate, pick the best, write checkpoints and metrics.csv; the epoch's row."""
    spec, state = run.spec, run.state
    sums = state.sums
    seconds = sums["seconds"]
    row = {
        "epoch": state.epoch + 1,
        "lr": run.lr,
        "train_loss": sums["loss"] / max(sums["seen"], 1),
        "train_acc": sums["correct"] / max(sums["seen"], 1),
        "seconds": round(seconds, 3),
        "img_per_s": round(sums["seen"] / max(seconds, 1e-9), 1),
    }
    eval_model = run.eval_model()
    if len(run.data.val.y):
        val = validate(run, eval_model)
        if not (math.isfinite(val["loss"])):
            raise _diverged(
                "the validation loss is NaN or infinite (the model's outputs are not finite)", state.epoch
            )
        row.update(val_loss=val["loss"], val_acc=val["acc"], **({"val_f1": val["f1"]} if "f1" in val else {}))
    if run.ema is not None and not _finite(run.ema.model.parameters()):
        raise _diverged(
            "the EMA weights became NaN or infinite",
            state.epoch,
            run.steps_per_epoch - 1,
            run.steps_per_epoch,
        )

    row["elapsed"] = round(time.perf_counter() - run.started, 3)  # validated, not yet saved
    state.history.append(row)
    state.epoch, state.step = state.epoch + 1, 0
    state.sums = State().sums
    value = row[run.monitor]
    min_delta = spec.early_stopping.min_delta if spec.early_stopping else 0.0
    weight_row = {k: v for k, v in row.items() if k not in TIMINGS}
    if _is_better(value, state.best, run.monitor, min_delta):
        state.best, state.best_epoch, state.bad_epochs = value, row["epoch"], 0
        if run.group.main:
            ck.save_checkpoint(
                run.run_dir / ck.BEST, eval_model, {**run.meta, "epoch": row["epoch"], "metrics": weight_row}
            )
    else:
        state.bad_epochs += 1
    _save_last(run)
    if run.group.main:
        _write_metrics(run.run_dir, state.history)
    bar.end_epoch(row, spec.epochs)
    if not progress:
        run.log(_epoch_line(row, spec.epochs))
    return row


@torch.no_grad()
def validate(run: Run, model: nn.Module) -> dict:
    """Loss and accuracy on the validation split, through the one inference path;
    summed on the device, read back once.

    Multi-label: ``loss`` is the mean binary cross-entropy per label, ``acc``
    the exact-match ratio and ``f1`` the macro F1, both at the 0.5 threshold
    (``val_f1`` is what the best checkpoint and early stopping monitor by default).
    """
    x, y = run.data.val.x, run.data.val.y
    if run.task == "multilabel":
        return _validate_multilabel(run, model)
    n = len(y)
    share = run.group.split(n)  # each rank its rows; the sums are added over ranks
    x, y = x[share.start : share.stop], y[share.start : share.stop]
    model.eval()
    loss = torch.zeros(
        (), dtype=torch.float32 if run.device.type == "mps" else torch.float64, device=run.device
    )
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    batches = _val_logits(run, model, x)
    for rows, logits in batches:
        yb = y[rows].to(run.device)
        loss += F.cross_entropy(logits, yb, reduction="sum").to(loss.dtype)
        correct += (logits.argmax(1) == yb).sum()
    run.group.sum(loss)
    run.group.sum(correct)
    return {"loss": float(loss) / n, "acc": int(correct) / n}


def _task(recipe: Recipe, data, log: Log) -> str:
    task = getattr(data.source, "task", "single")
    if task == "multilabel":
        if recipe.data.task == "auto":
            log(
                "data: some rows carry several labels: training a multi-label model "
                "(sigmoid outputs, binary cross-entropy); data.task: single refuses such rows"
            )
        if recipe.train.class_weights != "none" or recipe.data.sampler != "shuffle":
            raise RecipeError(
                "train.class_weights and data.sampler: balanced are for single-label data; "
                "a multi-label run weighs rare labels with train.pos_weight: auto"
            )
        monitor = recipe.train.early_stopping.monitor if recipe.train.early_stopping else None
        if monitor == "val_acc":
            log("note: for multi-label, val_acc is the exact-match ratio; val_f1 (macro F1) is the default")
    elif recipe.train.early_stopping and recipe.train.early_stopping.monitor == "val_f1":
        raise RecipeError(
            "train.early_stopping.monitor: val_f1 is a multi-label metric; use val_acc or val_loss"
        )
    return task


def make_loss(
    task: str, spec, train_y: torch.Tensor, device: torch.device, class_weights: torch.Tensor | None = None
) -> Callable:
    """The training loss, ``(float logits, target) -> scalar``.

    Single label: cross-entropy (targets: class indices, or soft rows from
    mixup/cutmix), weighted per class by ``train.class_weights``. Multi-label: binary cross-entropy with logits, one sigmoid
    per class; ``train.pos_weight: auto`` weighs each class's positives by
    negatives/positives in the training split (rare labels count more);
    label smoothing moves targets towards 0.5.
    """
    smoothing = spec.label_smoothing
    if task != "multilabel":
        from imgcls.imbalance import loss_fn

        return loss_fn(class_weights, smoothing, device)
    pos_weight = None
    if spec.pos_weight == "auto":
        positives = train_y.sum(0)
        pos_weight = ((len(train_y) - positives) / positives.clamp(min=1)).clamp(min=1e-3).to(device)

    def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if smoothing:
            target = target * (1 - smoothing) + smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)

    return bce


def _val_logits(run: Run, model: nn.Module, x: torch.Tensor):
    """The validation images' logits, batch by batch, through the one inference path."""
    return tensor_logits(
        model,
        x,
        run.data.mean,
        run.data.std,
        batch_size=run.spec.batch_size * 2,
        device=run.device,
        dtype=run.dtype,
        channels_last=run.channels_last,
    )


@torch.no_grad()
def _validate_multilabel(run: Run, model: nn.Module) -> dict:
    from imgcls.metrics import multilabel_f1

    x, y = run.data.val.x, run.data.val.y
    model.eval()
    batches = _val_logits(run, model, x)
    scores = torch.cat([logits for _, logits in batches]).float()
    target = y.to(scores.device)
    loss = F.binary_cross_entropy_with_logits(scores.double(), target.double())
    predicted = scores >= 0  # sigmoid >= 0.5, as predict decides
    exact = (predicted == (target > 0.5)).all(1).double().mean()
    return {"loss": float(loss), "acc": float(exact), "f1": multilabel_f1(predicted, target > 0.5)["macro"]}


def _save_last(run: Run) -> None:
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


def _augmentation(recipe: Recipe, num_classes: int):
    from imgcls.data.augment import build_augment, mix_batch

    spec = recipe.data.augment
    augment = build_augment(spec, recipe.data.size)
    mix = None
    if spec.mixup > 0 or spec.cutmix > 0:

        def mix(x, y, gen):
            return mix_batch(x, y, num_classes, spec.mixup, spec.cutmix, gen)

    return augment, mix


# --------------------------------------------------------------------------- outputs


def _write_summary(run_dir: Path, model: nn.Module, input_shape) -> None:
    from imgcls.summary import summarize_model, summary_text

    summary = summarize_model(model, tuple(input_shape))
    ck.write_text_atomic(run_dir / "summary.txt", summary_text(summary))
    ck.write_text_atomic(run_dir / "summary.json", json.dumps(summary.to_dict(), indent=2))


COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "img_per_s", "elapsed"]


def _elapsed(history: list[dict]) -> float:
    """The wall time a run had taken by its last finished epoch (older runs
    have no ``elapsed``: the sum of their epochs' step times)."""
    if not history:
        return 0.0
    last = history[-1].get("elapsed")
    return float(last) if last is not None else float(sum(h.get("seconds") or 0 for h in history))


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    columns = COLUMNS if "val_f1" not in history[0] else [*COLUMNS[:6], "val_f1", *COLUMNS[6:]]
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(history)
    ck.write_text_atomic(run_dir / "metrics.csv", buffer.getvalue())


def _plot(run_dir: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax_loss), ("acc", ax_acc)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], marker="o", label="train")
        if "val_" + key in history[0]:
            ax.plot(epochs, [h.get(f"val_{key}") for h in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.set_title("loss" if key == "loss" else "accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with ck.atomic_path(run_dir / "curves.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def _epoch_line(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:.4f}"
    if "val_loss" in row:
        text += f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}"
        if "val_f1" in row:
            text += f"  val_f1 {row['val_f1']:.4f}"
    return text + f"  {row['img_per_s']:.0f} img/s  {row['seconds']:.1f}s"


class _Progress:
    """A live bar for the running epoch on a terminal (loss, accuracy, img/s,
    ETA), with one permanent line per finished epoch above it; nothing otherwise."""

    REFRESH = 0.25  # seconds between reads of the device's running sums

    def __init__(self, enabled: bool, epochs: int, steps: int):
        self.epochs, self.steps = epochs, steps
        self.progress = self.task = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self.progress.start()

    def start_epoch(self, epoch: int, step: int, stats: Callable[[], tuple[float, float, int]]) -> None:
        if self.progress:
            self.task = self.progress.add_task(
                f"epoch {epoch + 1}/{self.epochs}", total=self.steps, completed=step, stats=""
            )
            self.stats, self.t0, self.seen0 = stats, time.perf_counter(), None
            self.last = 0.0

    def advance(self) -> bool:
        """One step done. The loss and accuracy are read from the device at most
        every REFRESH seconds (each read waits for the device); True when read."""
        if not self.progress:
            return False
        self.progress.update(self.task, advance=1)
        now = time.perf_counter()
        if now - self.last < self.REFRESH:
            return False
        self.last = now
        loss, acc, seen = self.stats()
        if self.seen0 is None:
            self.seen0, self.t0 = seen, now
        rate = (seen - self.seen0) / max(now - self.t0, 1e-9)
        self.progress.update(self.task, stats=f"loss {loss:.3f} acc {acc:.3f} {rate:.0f} img/s")
        return True

    def end_epoch(self, row: dict, epochs: int) -> None:
        if self.progress:
            self.progress.remove_task(self.task)
            self.progress.console.print(_epoch_line(row, epochs), highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
