"""The training loop: one plain function from batch to optimizer step.

Randomness is a function of (seed, epoch, step): the shuffle order of an
epoch and the augmentation / dropout draws of a step are seeded from those
numbers, never from history. So a run resumed at any step continues with
exactly the draws the uninterrupted run would have made, and
``deterministic: true`` runs give bit-identical weights.
"""

from __future__ import annotations

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
from imgcls.errors import CheckpointError, Interrupted, RecipeError, UsageError
from imgcls.models.build import build_model, main_logits
from imgcls.recipe import Recipe, dump_yaml, recipe_from_dict, recipe_to_dict

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


def choose_precision(precision: str, device: torch.device) -> torch.dtype:
    """fp32 / bf16 / fp16 as asked; ``auto`` by device kind, from bench/train_throughput.py.

    CPU: fp32. On a 2-core AVX512-BF16 EPYC, bf16 autocast against fp32 was
    1.26x (quickstart), 1.35x (resnet-style) but 0.85x (mobilenet-style:
    depthwise convs have no fast bf16 kernel), so it is an opt-in, not a
    default. CUDA: bf16 where supported (no loss scaling), else fp16. MPS: fp32.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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


def _is_better(value: float, best: float | None, monitor: str, min_delta: float) -> bool:
    if best is None:
        return True
    return value < best - min_delta if monitor.endswith("loss") else value > best + min_delta


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
    ``on_epoch_end`` gets each finished epoch's metrics row once checkpoints
    and metrics.csv are written; an exception it raises ends the run.
    """
    spec = recipe.train
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=False)
    device = choose_device(spec.device)
    dtype = choose_precision(spec.precision, device)
    channels_last = choose_channels_last(spec.channels_last, device)

    from imgcls.tracking import check_trackers, open_tracker  # train.log_to: tensorboard, mlflow

    check_trackers(spec.log_to)
    if out is not None and resume is None:
        ck.claim_out_dir(out)  # a usage error before minutes of decoding, not after
    saved_meta = None
    if resume is not None:
        saved_meta = ck.read_meta(resume / ck.LAST) if (resume / ck.LAST).exists() else None
        if saved_meta is None:
            raise CheckpointError(f"{resume}: no {ck.LAST}; this run cannot be resumed")
        saved = recipe_from_dict(saved_meta["recipe"], f"{resume}/{ck.LAST} (recipe)")
        if saved.model != recipe.model:
            raise CheckpointError(
                f"{resume}: the recipe's model differs from the run's; resume refuses to change the architecture"
            )

    from imgcls.data import prepare_data
    from imgcls.data.loader import normalize

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
    data = prepare_data(data_spec, base_dir, None, log)
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
    optimizer = make_optimizer(model, spec.optimizer)
    penalties = regularized_weights(model, recipe.model.l1, recipe.model.l2)
    ema = EMA(model, spec.ema.decay) if spec.ema else None
    state = State()

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

    if resume is not None:
        run_dir = resume
        from safetensors.torch import load_file

        try:
            ck.load_weights(model, load_file(str(resume / ck.LAST)))
        except RuntimeError as exc:
            raise CheckpointError(
                f"{resume}: the run's weights do not fit this recipe's model (input size or classes changed?): "
                f"{str(exc).splitlines()[0]}"
            ) from None
        saved_state = ck.load_resume(resume / ck.RESUME)
        optimizer.load_state_dict(saved_state["optimizer"])
        if (ema is not None) != bool(saved_state.get("ema")):
            raise CheckpointError(
                f"{resume}: train.ema differs from the run's; resume cannot switch EMA on or off"
            )
        if ema is not None:
            ema.model.load_state_dict(saved_state["ema"])
        # the resumed recipe may extend epochs etc.: the folder describes what runs now
        ck.write_text_atomic(run_dir / "recipe.yaml", dump_yaml(resolved_recipe))
        state = State(**saved_state["state"])
        log(f"resuming {run_dir} at epoch {state.epoch + 1}, step {state.step}")
    else:
        run_dir = out if out is not None else ck.new_run_dir(Path(spec.out), recipe.name)
        ck.write_text_atomic(run_dir / "recipe.yaml", dump_yaml(resolved_recipe))
        _write_summary(run_dir, model, input_shape)
        log(f"run folder: {run_dir}")
    precision_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    log(f"device: {device.type}, {precision_name}{', channels_last' if channels_last else ''}")
    run_info = {"device": device.type, "precision": precision_name, "channels_last": channels_last}
    ck.write_text_atomic(run_dir / "run.json", json.dumps({**run_info, "torch": torch.__version__}, indent=2))
    tracker = open_tracker(spec.log_to, run_dir, log)
    tracker.start(resolved, run_info)

    augment, mix = _augmentation(recipe, len(classes))
    train_x, train_y = data.train.x, data.train.y
    n = len(train_y)
    batch_size = min(spec.batch_size, n)
    steps_per_epoch = max(n // batch_size, 1)  # drop the ragged last batch (BatchNorm)
    total_steps = steps_per_epoch * spec.epochs
    monitor = spec.early_stopping.monitor if spec.early_stopping else "val_acc"
    has_val = len(data.val.y) > 0
    if not has_val:
        monitor = "train_loss"
        log("no validation split: the best checkpoint is chosen on training loss")

    def to_input(xb: torch.Tensor) -> torch.Tensor:
        xb = normalize(xb.to(device, non_blocking=True), data.mean, data.std)
        return xb.contiguous(memory_format=torch.channels_last) if channels_last else xb

    interrupted = {"flag": False}

    def on_sigint(signum, frame):
        if interrupted["flag"]:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        interrupted["flag"] = True
        log("stopping after this step (Ctrl-C again to abort without saving)")

    previous_handler = None
    try:
        previous_handler = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread
        pass

    def save_state() -> None:
        ck.save_checkpoint(run_dir / ck.LAST, model, {**meta, "epoch": state.epoch, "step": state.step})
        ck.save_resume(
            run_dir / ck.RESUME,
            {
                "optimizer": optimizer.state_dict(),
                "ema": ema.model.state_dict() if ema else {},
                "scaler": scaler.state_dict() if scaler.is_enabled() else {},
                "state": state.__dict__,
            },
        )

    autocast = dtype != torch.float32
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if resume is not None and saved_state.get("scaler"):
        scaler.load_state_dict(saved_state["scaler"])
    steps_done = 0
    bar = _Progress(progress, spec.epochs, steps_per_epoch)
    stopped_early = False
    try:
        while state.epoch < spec.epochs:
            epoch = state.epoch
            model.train()
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(spec.seed, epoch)))
            bar.start_epoch(epoch, state.step)
            started = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            for step in range(state.step, steps_per_epoch):
                global_step = epoch * steps_per_epoch + step
                lr = lr_at(global_step, total_steps, steps_per_epoch, spec.optimizer.lr, spec.schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                idx = perm[step * batch_size : (step + 1) * batch_size]
                xb, yb = train_x[idx], train_y[idx]
                gen = torch.Generator().manual_seed(_seed(spec.seed, epoch, step))
                torch.manual_seed(_seed(spec.seed, epoch, step, 1))  # dropout, stochastic depth
                if augment is not None:
                    xb = augment(xb, gen)
                xb, yb = to_input(xb), yb.to(device)
                target = yb
                if mix is not None:
                    xb, target = mix(xb, yb, gen)
                with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    logits = main_logits(model(xb))
                    loss = F.cross_entropy(logits.float(), target, label_smoothing=spec.label_smoothing)
                if penalties:
                    loss = loss + sum(a * w.abs().sum() + b * w.pow(2).sum() for w, a, b in penalties)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # fp16 only: loss scaling against underflow
                if spec.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), spec.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                if ema is not None:
                    ema.update(model)
                labels = yb if target.ndim == 1 else target.argmax(1)
                state.sums["loss"] += loss.item() * len(yb)
                state.sums["correct"] += int((logits.argmax(1) == labels).sum())
                state.sums["seen"] += len(yb)
                state.step = step + 1
                steps_done += 1
                bar.advance(state.sums)
                if interrupted["flag"] or (stop_after_steps is not None and steps_done >= stop_after_steps):
                    state.sums["seconds"] += time.perf_counter() - started
                    save_state()
                    raise Interrupted(
                        f"interrupted in epoch {epoch + 1} at step {state.step}/{steps_per_epoch}; "
                        f"state saved. Resume with: imgcls train --resume {run_dir}"
                    )
            seconds = state.sums["seconds"] + time.perf_counter() - started
            row = {
                "epoch": epoch + 1,
                "lr": lr,
                "train_loss": state.sums["loss"] / max(state.sums["seen"], 1),
                "train_acc": state.sums["correct"] / max(state.sums["seen"], 1),
                "seconds": round(seconds, 3),
                "img_per_s": round(state.sums["seen"] / max(seconds, 1e-9), 1),
            }
            eval_model = ema.model if ema is not None else model
            if has_val:
                val = evaluate_tensors(
                    eval_model, data.val.x, data.val.y, to_input, device, dtype, spec.batch_size * 2
                )
                row.update(val_loss=val["loss"], val_acc=val["acc"])
            state.history.append(row)
            state.epoch, state.step = epoch + 1, 0
            state.sums = State().sums
            value = row[monitor]
            min_delta = spec.early_stopping.min_delta if spec.early_stopping else 0.0
            if _is_better(value, state.best, monitor, min_delta):
                state.best, state.best_epoch, state.bad_epochs = value, epoch + 1, 0
                ck.save_checkpoint(
                    run_dir / ck.BEST, eval_model, {**meta, "epoch": epoch + 1, "metrics": row}
                )
            else:
                state.bad_epochs += 1
            save_state()
            _write_metrics(run_dir, state.history)
            tracker.epoch(row)
            bar.end_epoch(row, spec.epochs)
            if not progress:
                log(_epoch_line(row, spec.epochs))
            if on_epoch_end is not None:
                on_epoch_end(row)
            if spec.early_stopping and state.bad_epochs >= spec.early_stopping.patience:
                log(f"early stop: {monitor} has not improved for {state.bad_epochs} epochs")
                stopped_early = True
                break
    finally:
        bar.close()
        tracker.finish(
            run_dir / ck.BEST if state.best_epoch else None,
            completed=state.epoch >= spec.epochs or stopped_early,
        )
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
        if state.history:
            _plot(run_dir, state.history)
    best = state.history[state.best_epoch - 1] if state.best_epoch else {}
    return TrainResult(run_dir, state.history, state.best_epoch, best, stopped_early)


@torch.no_grad()
def evaluate_tensors(model, x, y, to_input, device, dtype, batch_size: int) -> dict:
    model.eval()
    loss, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        xb, yb = to_input(x[i : i + batch_size]), y[i : i + batch_size].to(device)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            logits = main_logits(model(xb)).float()
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += int((logits.argmax(1) == yb).sum())
    return {"loss": loss / len(y), "acc": correct / len(y)}


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

    def start_epoch(self, epoch: int, step: int) -> None:
        if self.progress:
            self.task = self.progress.add_task(
                f"epoch {epoch + 1}/{self.epochs}", total=self.steps, completed=step, stats=""
            )
            self.t0, self.seen0 = time.perf_counter(), None

    def advance(self, sums: dict) -> None:
        if self.progress:
            if self.seen0 is None:
                self.seen0 = sums["seen"]
            rate = (sums["seen"] - self.seen0) / max(time.perf_counter() - self.t0, 1e-9)
            stats = f"loss {sums['loss'] / sums['seen']:.3f} acc {sums['correct'] / sums['seen']:.3f} {rate:.0f} img/s"
            self.progress.update(self.task, advance=1, stats=stats)

    def end_epoch(self, row: dict, epochs: int) -> None:
        if self.progress:
            self.progress.remove_task(self.task)
            self.progress.console.print(_epoch_line(row, epochs), highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
