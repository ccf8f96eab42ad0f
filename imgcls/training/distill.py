"""Knowledge distillation (``train.distill``): a frozen teacher's softened
outputs as a second target for the student.

The loss of a step, with T the temperature and s, t the student's and the
teacher's logits (alpha weighs the teacher's term, as in Hinton et al., 2015)::

    alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * the usual loss

KL is summed over classes and averaged over images (``batchmean``); T^2
keeps its gradients on the scale of the usual loss whatever T is. A
multi-label run uses one sigmoid per class instead of the softmax: the
binary KL of each label's softened probability, averaged over images and
labels, like its binary cross-entropy.

The teacher (a run folder, a checkpoint or an export) is opened through the
inference path (:func:`imgcls.predictor.load_predictor`), so an ONNX teacher
runs in ONNX Runtime. Its classes must be the student's: in the same order,
or the same names in another order (its outputs are then reordered by name).

**When the teacher runs.** Without augmentation (no ``data.augment`` op, no
mixup/cutmix) the student sees each image as decoded, every epoch: the
teacher's logits are computed once per training image before the first step
and kept on the device (N x classes floats). With augmentation they are
computed every step on the augmented (and mixed) batch the student sees:
the teacher and the student see the same view ("consistent teaching",
Beyer et al., 2022), which matters more than the teacher's cost. A resumed
run computes the cache again (the teacher is deterministic), so it equals
the uninterrupted run. Under DDP each rank computes the teacher's logits of
its own share of each batch (the cache: every rank keeps the whole set).

**Preprocessing.** The teacher gets the student's images converted to its
own input: its channels (grey to RGB repeats the channel, as decoding does;
RGB to grey uses the ITU-R 601 weights Pillow uses), its size (bilinear,
antialiased) and its mean/std. A teacher that resizes differently
(``resize``: stretch / center_crop / pad) is refused: that view cannot be
rebuilt from the student's decoded images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imgcls import interrupts
from imgcls.errors import ImgclsError, RecipeError
from imgcls.forward import logits as forward_logits
from imgcls.forward import normalize, to_float
from imgcls.predictor import Predictor, load_predictor

Log = Callable[[str], None]
KEY = "train.distill.teacher"
_LUMA = (0.299, 0.587, 0.114)  # Pillow's RGB -> L weights


def teacher_path(teacher: str, base_dir: Path) -> Path:
    """``train.distill.teacher`` as a path: relative ones from the recipe's folder."""
    from imgcls.data.sources import resolve

    return resolve(teacher, base_dir)


def open_teacher(spec, base_dir: Path, log: Log) -> Predictor | None:
    """The teacher of ``train.distill`` (None without it), loaded through the
    inference path; a missing or unreadable one is refused in one line
    naming the key."""
    if spec is None:
        return None
    path = teacher_path(spec.teacher, base_dir)
    if not path.exists():
        raise RecipeError(f"{KEY}: {path}: no such run folder, checkpoint or export")
    try:
        predictor = load_predictor(path, log=log)
    except ImgclsError as exc:
        raise type(exc)(f"{KEY}: {exc}") from None
    if isinstance(predictor.forward, nn.Module):
        predictor.forward.eval().requires_grad_(False)
    return predictor


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, multilabel: bool
) -> torch.Tensor:
    """T^2 x the KL divergence from the teacher's softened outputs to the
    student's (softmax over classes; one sigmoid per label when ``multilabel``)."""
    s, t = student.float() / temperature, teacher.float() / temperature
    if multilabel:
        p = torch.sigmoid(t)
        # binary KL per label = cross-entropy(p, sigmoid(s)) - entropy(p); mean over images and labels
        kl = F.binary_cross_entropy_with_logits(s, p) - F.binary_cross_entropy_with_logits(t, p)
    else:
        kl = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    return kl * (temperature * temperature)


@dataclass
class Teacher:
    """A teacher bound to a run: its input made from the student's, its
    outputs in the student's class order, and the cache when there is one."""

    predictor: Predictor
    temperature: float
    alpha: float
    multilabel: bool
    device: torch.device
    dtype: torch.dtype
    student_stats: tuple[torch.Tensor, torch.Tensor]  # (1, C, 1, 1) mean and std of the student's input
    order: torch.Tensor | None = None  # teacher column per student class, when the orders differ
    cache: torch.Tensor | None = None  # (N, K) logits of every training image, when cacheable

    def logits(self, x01: torch.Tensor) -> torch.Tensor:
        """Teacher logits (student's class order) of a float 0..1 batch in the student's format."""
        pre = self.predictor.preprocessing
        x = x01.float()
        channels = int(pre["channels"])
        if channels == 3 and x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif channels == 1 and x.shape[1] == 3:
            x = (x * torch.tensor(_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        size = tuple(int(v) for v in pre["image_size"])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        x = normalize(x.contiguous(), pre["mean"], pre["std"])
        with torch.no_grad():
            out = forward_logits(self.predictor.forward, x, dtype=self.dtype).to(self.device)
        return out if self.order is None else out[:, self.order]

    def targets(self, rows: torch.Tensor, x_student: torch.Tensor) -> torch.Tensor:
        """The teacher's logits of a step's images: from the cache by row, or
        computed on the (augmented, mixed) normalised batch the student got."""
        if self.cache is not None:
            return self.cache[rows.to(self.cache.device, non_blocking=True)]
        mean, std = self.student_stats
        return self.logits(x_student.float() * std + mean)

    def loss(
        self, student: torch.Tensor, usual: torch.Tensor, rows: torch.Tensor, x_student: torch.Tensor
    ) -> torch.Tensor:
        kd = distill_loss(student, self.targets(rows, x_student), self.temperature, self.multilabel)
        return self.alpha * kd + (1 - self.alpha) * usual


def bind_teacher(run: Any, predictor: Predictor | None) -> Teacher | None:
    """Check the teacher against the run (classes, task, preprocessing), then
    cache its logits of the training set when no augmentation changes them."""
    if predictor is None:
        return None
    spec, data = run.spec.distill, run.data
    order = class_order(predictor.classes, list(data.classes), predictor.source, run.log)
    multilabel = run.task == "multilabel"
    if (predictor.task == "multilabel") != multilabel:
        kinds = {True: "multi-label", False: "single-label"}
        raise RecipeError(
            f"{KEY}: {predictor.source} is a {kinds[predictor.task == 'multilabel']} model, "
            f"the data is {kinds[multilabel]}; distill from a teacher of the same task"
        )
    check_preprocessing(predictor.preprocessing, run.recipe.data, predictor.source)
    if isinstance(predictor.forward, nn.Module):
        predictor.forward.to(run.device)
    c = len(data.mean)
    stats = (
        torch.tensor(data.mean, dtype=torch.float32, device=run.device).view(1, c, 1, 1),
        torch.tensor(data.std, dtype=torch.float32, device=run.device).view(1, c, 1, 1),
    )
    teacher = Teacher(
        predictor, spec.temperature, spec.alpha, multilabel, run.device, run.dtype, stats, order
    )
    how = "per step, on the augmented batch"
    if cacheable(run):
        started = time.perf_counter()
        teacher.cache = teacher_logits(teacher, data.train.x, run.spec.batch_size * 2)
        how = f"once per image ({len(data.train.y)} images, {time.perf_counter() - started:.1f} s)"
    run.log(
        f"distill: teacher {predictor.source}, temperature {spec.temperature:g}, alpha {spec.alpha:g}; "
        f"its logits computed {how}"
    )
    return teacher


def cacheable(run: Any) -> bool:
    """Whether the student sees each training image as decoded (no augmentation,
    no mixup/cutmix): then the teacher's logits are computed once per image."""
    return run.augment is None and run.mix is None


def teacher_logits(teacher: Teacher, x_uint8: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The teacher's logits of a decoded uint8 set, batch by batch, on the run's device."""
    parts = []
    for start in range(0, len(x_uint8), batch_size):
        interrupts.check()
        xb = to_float(x_uint8[start : start + batch_size].to(teacher.device, non_blocking=True))
        parts.append(teacher.logits(xb))
    return torch.cat(parts)


def class_order(teacher: list[str], student: list[str], source: str, log: Log) -> torch.Tensor | None:
    """None when the lists are equal; the teacher's column of each student
    class when they hold the same names in another order; else refused."""
    if teacher == student:
        return None
    if len(set(teacher)) == len(teacher) and sorted(teacher) == sorted(student):
        log("distill: the teacher's classes are in another order; its outputs are matched by name")
        return torch.tensor([teacher.index(name) for name in student])
    raise RecipeError(f"{KEY}: {source}: the teacher's classes {teacher} differ from the data's {student}")


def check_preprocessing(pre: dict, data_spec, source: str) -> None:
    """The teacher's view must be one its input can be made from: same resize policy."""
    theirs, ours = pre.get("resize", "stretch"), data_spec.resize
    if theirs != ours or "resize_to" in pre:
        raise RecipeError(
            f"{KEY}: {source} resizes images by '{theirs}', this recipe by '{ours}' (data.resize); "
            "distillation needs the same policy"
        )
