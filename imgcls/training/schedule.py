"""Optimisation: the optimizer, the learning rate at a step, weight penalties, EMA.

Layer decay and per-stage learning rates are parameter groups
(:func:`imgcls.models.finetune.param_groups`); the learning rate is a pure
function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from imgcls.models import finetune


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
