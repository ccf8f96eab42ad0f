"""The model as a step calls it: wrapped in DistributedDataParallel with
several processes, and compiled with ``train.compile``."""

from __future__ import annotations

from collections.abc import Callable

import torch

from imgcls.training.state import Run


def distribute(run: Run) -> bool:
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


def compiled(run: Run) -> Callable:
    """``torch.compile(model)`` with ``train.compile`` (compiled lazily, at the
    first step, whose time is then reported apart: :func:`imgcls.training.loop._compile_done`).
    The weights stay those of ``run.model``: checkpoints are unchanged."""
    net = run.ddp or run.model
    if not run.spec.compile:
        return net
    run.compile_pending = True
    return torch.compile(net)
