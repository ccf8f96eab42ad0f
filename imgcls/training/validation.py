"""Validation and the training loss: one pass over the validation split
through the one forward path, summed on the device and read back once.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.errors import Diverged
from imgcls.forward import tensor_logits
from imgcls.training.state import Run


def epoch_row(run: Run) -> dict:
    """The finished epoch's row of metrics.csv: the training sums, and the
    validation metrics of the model the best checkpoint would hold."""
    state, sums = run.state, run.state.sums
    seconds = sums["seconds"]
    row = {
        "epoch": state.epoch + 1,
        "lr": run.lr,
        "train_loss": sums["loss"] / max(sums["seen"], 1),
        "train_acc": sums["correct"] / max(sums["seen"], 1),
        "seconds": round(seconds, 3),
        "img_per_s": round(sums["seen"] / max(seconds, 1e-9), 1),
    }
    if len(run.data.val.y):
        val = validate(run, run.eval_model())
        if not (math.isfinite(val["loss"])):
            raise diverged(
                "the validation loss is NaN or infinite (the model's outputs are not finite)", state.epoch
            )
        row.update(val_loss=val["loss"], val_acc=val["acc"], **({"val_f1": val["f1"]} if "f1" in val else {}))
    if run.ema is not None and not finite(run.ema.model.parameters()):
        raise diverged(
            "the EMA weights became NaN or infinite",
            state.epoch,
            run.steps_per_epoch - 1,
            run.steps_per_epoch,
        )
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


def calibrate(run: Run) -> dict:
    """At the end of a run (rank 0): fit the temperature on the validation
    logits of the kept weights (best.safetensors, read back: under DDP, and
    after a resume, they are the weights an uninterrupted one-process run
    keeps) over the whole validation split, and store it in best and last
    (:func:`imgcls.checkpoint.store_calibration`). No validation split: T = 1,
    said so in the metadata. Returns the stored ``calibration`` document."""
    from imgcls import calibration
    from imgcls.checkpoint import BEST, LAST, load_checkpoint, store_calibration

    multilabel = run.task == "multilabel"
    y = run.data.val.y
    if not len(y):
        stored = calibration.uncalibrated(len(run.data.classes), multilabel)
    else:
        model = load_checkpoint(run.run_dir / BEST).model.to(run.device)
        with torch.no_grad():
            scores = torch.cat([z.float().cpu() for _, z in _val_logits(run, model, run.data.val.x)])
        fitted_on = f"the run's validation split ({len(y)} images)"
        stored, _ = calibration.fitted(scores, y, multilabel, fitted_on)
    store_calibration([run.run_dir / BEST, run.run_dir / LAST], stored)
    return stored


def diverged(what: str, epoch: int, step: int | None = None, steps: int = 0) -> Diverged:
    where = (
        f"at epoch {epoch + 1}, step {step + 1}/{steps}" if step is not None else f"after epoch {epoch + 1}"
    )
    return Diverged(
        f"{what} {where}; stopped, nothing of it saved. "
        "Lower train.optimizer.lr, set train.grad_clip, or use train.precision: fp32"
    )


def finite(tensors) -> bool:
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True
