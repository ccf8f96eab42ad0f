"""Uneven classes: counts and their warning, loss weights, the balanced sampler.

All pure functions of the labels (and of (seed, epoch) for the sampler), so
a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from imgcls.errors import RecipeError

IMBALANCE_WARNING = 10  # largest class / smallest class above this: warn


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    """Images per class: class indices, or multi-hot rows (an image counts for each of its labels)."""
    if labels.ndim == 2:
        return labels.sum(0).long().tolist()
    return torch.bincount(labels.long(), minlength=num_classes).tolist()


def count_lines(what: str, classes: Sequence[str], counts: Sequence[int], hint: bool = False) -> list[str]:
    """``train class counts: a 200, b 10`` and, past 10:1, a warning (with ``hint``:
    naming the recipe keys that help)."""
    shown = ", ".join(f"{c} {n}" for c, n in zip(classes, counts, strict=True))
    lines = [f"{what} class counts: {shown}"]
    present = [n for n in counts if n > 0]
    if present and max(present) > IMBALANCE_WARNING * min(present):
        big = classes[counts.index(max(present))]
        small = classes[counts.index(min(present))]
        lines.append(
            f"warning: imbalanced classes: '{big}' has {max(present)} images, '{small}' {min(present)} "
            f"({max(present) / min(present):.0f}:1); accuracy flatters the large classes, read balanced accuracy"
            + (" (consider train.class_weights: auto or data.sampler: balanced)" if hint else "")
        )
    return lines


def class_weights(spec, classes: Sequence[str], counts: Sequence[int]) -> torch.Tensor | None:
    """Loss weight per class: ``auto`` = N / (K * n_c) (inverse frequency,
    normalised so the mean weight over the training images is 1), a mapping of
    class name to weight (classes not named keep 1), or None."""
    if spec == "none":
        return None
    if spec == "auto":
        total, present = sum(counts), sum(1 for n in counts if n > 0)
        return torch.tensor([total / (present * n) if n else 0.0 for n in counts], dtype=torch.float32)
    unknown = sorted(set(spec) - set(classes))
    if unknown:
        raise RecipeError(
            f"train.class_weights: class '{unknown[0]}' is not in the data (classes: {', '.join(classes)})"
        )
    return torch.tensor([float(spec.get(c, 1.0)) for c in classes], dtype=torch.float32)


def loss_fn(weights: torch.Tensor | None, label_smoothing: float, device: torch.device) -> Callable:
    """The training loss: cross entropy, weighted per class when asked.

    Weighted, it is the mean over the batch of each image's weighted loss, not
    torch's default (divided by the batch's sum of weights): a sum over images
    divided by their count is the same whether one batch holds them or several
    micro-batches (gradient accumulation) or processes share them, so those
    take the step one batch takes. (Soft targets, mixup's, are already divided
    by the count in torch.)"""
    weight = weights.to(device) if weights is not None else None

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if weight is None:
            return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
        per_image = F.cross_entropy(
            logits, target, weight=weight, label_smoothing=label_smoothing, reduction="none"
        )
        return per_image.mean()

    return loss


def balanced_order(labels: torch.Tensor, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """One epoch of indices (as many as there are images) where every class
    present is drawn equally often on average: a class uniformly, then one of
    its images uniformly (with replacement)."""
    n = len(labels)
    present = [c for c in range(num_classes) if bool((labels == c).any())]
    members = [torch.nonzero(labels == c).flatten() for c in present]
    drawn = torch.randint(len(present), (n,), generator=generator)
    pick = torch.rand(n, generator=generator)
    order = torch.empty(n, dtype=torch.int64)
    for i, idx in enumerate(members):
        slots = drawn == i
        order[slots] = idx[(pick[slots] * len(idx)).long().clamp(max=len(idx) - 1)]
    return order
