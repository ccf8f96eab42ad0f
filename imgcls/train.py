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

from imgcls import __version__
from imgcls import checkpoint as ck
from imgcls.data.batches import epoch_order
from imgcls.errors import CheckpointError, Diverged, Interrupted, RecipeError, UsageError
from imgcls.infer import main_logits, model_input, tensor_logits
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
    """Weight decay applies to weights (ndim > 1), not to biases or norm scales."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    other = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": spec.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
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
    """Exponential moving average of the weights (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values(), strict=False):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - self.decay)
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
    history: list[dict] = field(default_factory=list)
    sums: dict = field(default_factory=lambda: {"loss": 0.0, "correct": 0, "seen": 0, "seconds": 0.0})


@dataclass
class TrainResult:
    run_dir: Path
    history: list[dict]
    best_epoch: int
    best: dict
    stopped_early: bool


TIMINGS = ("seconds", "img_per_s")  # in metrics.csv, never in a weight file (bit-identical runs)


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
    batches: object = None  # imgcls.data.batches source of training batches
    forward: Callable | None = None  # model, or torch.compile(model) with train.compile
    compile_pending: bool = False  # the first step compiles: timed apart from throughput
    lr: float = 0.0  # the learning rate of the epoch's last step

    @property
    def spec(self):
        return self.recipe.train

    @property
    def monitor(self) -> str:
        if not len(self.data.val.y):
            return "train_loss"
        return self.spec.early_stopping.monitor if self.spec.early_stopping else "val_acc"

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
    run = prepare(recipe, base_dir=base_dir, out=out, resume=resume, log=log)
    spec = run.spec
    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        interrupted["flag"] = True
        log("stopping after this step (Ctrl-C again to abort without saving)")

    previous_handler = None
    bar = _Progress(progress, spec.epochs, run.steps_per_epoch)
    stopped_early = False
    tracker = None  # train.log_to: opened at the first finished epoch, so a failed start leaves none
    steps_left = stop_after_steps
    try:
        with contextlib.suppress(ValueError):  # ValueError: not the main thread
            previous_handler = signal.signal(signal.SIGINT, on_sigint)
        while run.state.epoch < spec.epochs:
            finished, steps_left = train_one_epoch(run, bar, interrupted, steps_left)
            if not finished:
                raise Interrupted(
                    f"interrupted in epoch {run.state.epoch + 1} at step {run.state.step}/"
                    f"{run.steps_per_epoch}; state saved. Resume with: imgcls train --resume {run.run_dir}"
                )
            row = finish_epoch(run, bar, progress)
            if tracker is None:
                tracker = open_tracker(spec.log_to, run.run_dir, log)
                tracker.start(run.meta["recipe"], run.info)
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
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if run.state.history and run.saved:
            _plot(run.run_dir, run.state.history)
    state = run.state
    best = state.history[state.best_epoch - 1] if state.best_epoch else {}
    # the run's report.html (imgcls.report): a failure is a warning, not a failed run
    try:
        from imgcls.report import write_report

        write_report(run.run_dir)
    except Exception as exc:
        log(f"warning: could not write {run.run_dir / 'report.html'}: {exc}")
    return TrainResult(run.run_dir, state.history, state.best_epoch, best, stopped_early)


# --------------------------------------------------------------------------- prepare


def prepare(recipe: Recipe, *, base_dir: Path, out: Path | None, resume: Path | None, log: Log) -> Run:
    """Devices, data, model, optimizer, and (last, once all of that worked) the run folder."""
    spec = recipe.train
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    device = choose_device(spec.device)
    channels_last = choose_channels_last(spec.channels_last, device)
    check_trackers(spec.log_to)  # a missing extra fails before any work

    if out is not None and resume is None:
        ck.check_out_dir(out)  # a usage error before minutes of decoding, not after
    saved_meta = _resumable_meta(recipe, resume)
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
    model = build_model(recipe.model, input_shape, len(classes)).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    choice = _precision(
        spec, device, model, input_shape, len(classes), len(data.train.y), channels_last, resume, log
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

    n = len(data.train.y)
    batch_size = min(spec.batch_size, n)
    augment, mix = _augmentation(recipe, len(classes))
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
    )
    run.batches, run.forward = _batch_source(run), _compiled(run)
    # only now, with data and model ready, does the run get a folder
    if resume is not None:
        # the resumed recipe may extend epochs etc.: the folder describes what runs now
        ck.write_text_atomic(resume / "recipe.yaml", dump_yaml(resolved_recipe))
        log(f"resuming {resume} at epoch {state.epoch + 1}, step {state.step}")
    else:
        if out is not None:
            run.created, run.run_dir = ck.claim_out_dir(out), out
        else:
            run.created, run.run_dir = True, ck.new_run_dir(Path(spec.out), recipe.name)
        try:
            run.written += ["recipe.yaml", "summary.txt", "summary.json"]
            ck.write_text_atomic(run.run_dir / "recipe.yaml", dump_yaml(resolved_recipe))
            _write_summary(run.run_dir, model, input_shape)
        except BaseException:
            ck.remove_unstarted_run(run.run_dir, run.created, run.written)
            raise
        log(f"run folder: {run.run_dir}")
    if not len(data.val.y):
        log("no validation split: the best checkpoint is chosen on training loss")
    precision_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    log(f"device: {device.type}, {precision_name}{', channels_last' if channels_last else ''}")
    run.info = {"device": device.type, "precision": precision_name, "channels_last": channels_last}
    run.info.update(precision_choice=choice.info(), compile=spec.compile, batches=run.batches.mode)
    if "run.json" not in run.written and not run.saved:
        run.written.append("run.json")
    ck.write_text_atomic(
        run.run_dir / "run.json", json.dumps({**run.info, "torch": torch.__version__}, indent=2)
    )
    return run


def _resumable_meta(recipe: Recipe, resume: Path | None) -> dict | None:
    if resume is None:
        return None
    if not (resume / ck.LAST).exists():
        raise CheckpointError(f"{resume}: no {ck.LAST}; this run cannot be resumed")
    saved_meta = ck.read_meta(resume / ck.LAST)
    saved = recipe_from_dict(saved_meta["recipe"], f"{resume}/{ck.LAST} (recipe)")
    if saved.model != recipe.model:
        raise CheckpointError(
            f"{resume}: the recipe's model differs from the run's; resume refuses to change the architecture"
        )
    return saved_meta


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

    try:
        ck.load_weights(model, load_file(str(resume / ck.LAST)))
    except RuntimeError as exc:
        raise CheckpointError(
            f"{resume}: the run's weights do not fit this recipe's model (input size or classes changed?): "
            f"{str(exc).splitlines()[0]}"
        ) from None
    saved = ck.load_resume(resume / ck.RESUME)
    optimizer.load_state_dict(saved["optimizer"])
    if (ema is not None) != bool(saved.get("ema")):
        raise CheckpointError(
            f"{resume}: train.ema differs from the run's; resume cannot switch EMA on or off"
        )
    if ema is not None:
        ema.model.load_state_dict(saved["ema"])
    if saved.get("scaler"):
        scaler.load_state_dict(saved["scaler"])
    return State(**saved["state"])


def _precision(spec, device, model, input_shape, num_classes, n, channels_last, resume, log):
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
        deterministic=spec.deterministic,
        run_steps=max(n // min(spec.batch_size, n), 1) * spec.epochs,
        resumed_from=resume,
    )
    log(choice.line())
    return choice


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
    if not run.spec.compile:
        return run.model
    run.compile_pending = True
    return torch.compile(run.model)


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
    train_x, train_y = run.data.train.x, run.data.train.y
    forward = run.forward or model
    total_steps = steps * spec.epochs
    model.train()
    perm = epoch_order(
        len(train_y), train_x[0].numel(), torch.Generator().manual_seed(_seed(spec.seed, epoch))
    )
    sums = EpochSums(state.sums, device)

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
        for group in optimizer.param_groups:
            group["lr"] = lr
        # randomness from (seed, epoch, step) alone: a resumed run draws the same
        idx = perm[step * run.batch_size : (step + 1) * run.batch_size]
        xb, yb = run.batches.batch(idx)  # uint8 and labels, on the device
        gen = torch.Generator().manual_seed(_seed(spec.seed, epoch, step))
        torch.manual_seed(_seed(spec.seed, epoch, step, 1))  # dropout, stochastic depth
        if run.augment is not None:
            xb = run.augment(xb, gen)
        xb = model_input(xb, run.data.mean, run.data.std, device=device, channels_last=run.channels_last)
        target = yb
        if run.mix is not None:
            xb, target = run.mix(xb, yb, gen)

        with torch.autocast(device.type, dtype=run.dtype, enabled=run.dtype != torch.float32):
            logits = main_logits(forward(xb))
            loss = F.cross_entropy(logits.float(), target, label_smoothing=spec.label_smoothing)
        if run.penalties:
            loss = loss + sum(a * w.abs().sum() + b * w.pow(2).sum() for w, a, b in run.penalties)
        optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()  # fp16 only: loss scaling against underflow
        if spec.grad_clip:
            run.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
        run.scaler.step(optimizer)
        run.scaler.update()
        if run.ema is not None:
            run.ema.update(model)
        if run.compile_pending:
            started += _compile_done(run, started)

        sums.add(loss, logits, yb if target.ndim == 1 else target.argmax(1), step)
        state.step = step + 1
        if steps_left is not None:
            steps_left -= 1
        if bar.advance():
            check_finite(step)  # the bar read the device anyway: a free check
        if interrupted["flag"] or steps_left == 0:
            check_finite(step)  # never save weights after a non-finite step
            state.sums = {**sums.read(), "seconds": state.sums["seconds"] + time.perf_counter() - started}
            _save_last(run)
            return False, steps_left
    check_finite(steps - 1)
    state.sums = {**sums.read(), "seconds": state.sums["seconds"] + time.perf_counter() - started}
    run.lr = lr
    return True, steps_left


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
        row.update(val_loss=val["loss"], val_acc=val["acc"])
    if run.ema is not None and not _finite(run.ema.model.parameters()):
        raise _diverged(
            "the EMA weights became NaN or infinite",
            state.epoch,
            run.steps_per_epoch - 1,
            run.steps_per_epoch,
        )

    state.history.append(row)
    state.epoch, state.step = state.epoch + 1, 0
    state.sums = State().sums
    value = row[run.monitor]
    min_delta = spec.early_stopping.min_delta if spec.early_stopping else 0.0
    weight_row = {k: v for k, v in row.items() if k not in TIMINGS}
    if _is_better(value, state.best, run.monitor, min_delta):
        state.best, state.best_epoch, state.bad_epochs = value, row["epoch"], 0
        ck.save_checkpoint(
            run.run_dir / ck.BEST, eval_model, {**run.meta, "epoch": row["epoch"], "metrics": weight_row}
        )
    else:
        state.bad_epochs += 1
    _save_last(run)
    _write_metrics(run.run_dir, state.history)
    bar.end_epoch(row, spec.epochs)
    if not progress:
        run.log(_epoch_line(row, spec.epochs))
    return row


@torch.no_grad()
def validate(run: Run, model: nn.Module) -> dict:
    """Loss and accuracy on the validation split, through the one inference path;
    summed on the device, read back once."""
    x, y = run.data.val.x, run.data.val.y
    model.eval()
    loss = torch.zeros(
        (), dtype=torch.float32 if run.device.type == "mps" else torch.float64, device=run.device
    )
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    batches = tensor_logits(
        model,
        x,
        run.data.mean,
        run.data.std,
        batch_size=run.spec.batch_size * 2,
        device=run.device,
        dtype=run.dtype,
        channels_last=run.channels_last,
    )
    for rows, logits in batches:
        yb = y[rows].to(run.device)
        loss += F.cross_entropy(logits, yb, reduction="sum").to(loss.dtype)
        correct += (logits.argmax(1) == yb).sum()
    return {"loss": float(loss) / len(y), "acc": int(correct) / len(y)}


def _save_last(run: Run) -> None:
    state = run.state
    ck.save_checkpoint(
        run.run_dir / ck.LAST, run.model, {**run.meta, "epoch": state.epoch, "step": state.step}
    )
    ck.save_resume(
        run.run_dir / ck.RESUME,
        {
            "optimizer": run.optimizer.state_dict(),
            "ema": run.ema.model.state_dict() if run.ema else {},
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


COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "img_per_s"]


def _write_metrics(run_dir: Path, history: list[dict]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore")
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
