"""Batched augmentation over (B, C, H, W) tensors, airbench style.

Every function takes a whole batch and a ``torch.Generator`` and draws one
random parameter per image, so there is no per-image Python in the hot path
(TrivialAugment / RandAugment excepted, see :func:`auto_augment`). Random
parameters are drawn on the CPU from the generator and then moved to the
batch's device (non-blocking: no wait for the device): the same seed gives
the same augmentation on CPU and GPU.

:func:`build_augment` turns a recipe's ``augment`` section into one function
``(uint8 or float batch, generator) -> float batch in [0, 1]``. The order is:
TrivialAugment/RandAugment (on uint8) -> random crop with padding -> random
resized crop + rotation (one affine resampling) -> flips -> colour jitter ->
random erasing. Mixup/CutMix change the labels too, so they are separate:
:func:`mix_batch`.

Note that augmentation runs on the decoded cache, i.e. on images already
resized to the recipe's image size; a random resized crop therefore upsamples
a region of the small image rather than cropping the original photo.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.forward import to_float
from imgcls.recipe import AugmentSpec, ColorJitter

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def _rand(n: int, gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """``n`` uniform [0, 1) draws from ``gen`` (on CPU), moved next to ``like``."""
    return torch.rand(n, generator=gen).to(like.device, non_blocking=True)


def _uniform(n: int, low: float, high: float, gen: torch.Generator, like: torch.Tensor):
    return low + (high - low) * _rand(n, gen, like)


def _per_image(mask: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, 1, 1, 1)


# --------------------------------------------------------------------------- geometry


def random_crop(x: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Pad by ``padding`` (reflect) and cut a random same-size window per image."""
    if padding <= 0:
        return x
    b, c, h, w = x.shape
    mode = "reflect" if padding < min(h, w) else "replicate"
    padded = F.pad(x.float() if x.dtype == torch.uint8 else x, (padding,) * 4, mode=mode)
    padded = padded.to(x.dtype)
    dy = (torch.randint(0, 2 * padding + 1, (b,), generator=gen)).to(x.device, non_blocking=True)
    dx = (torch.randint(0, 2 * padding + 1, (b,), generator=gen)).to(x.device, non_blocking=True)
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    ci = torch.arange(c, device=x.device).view(1, c, 1, 1)
    return padded[bi, ci, rows, cols]


def flip(x: torch.Tensor, dim: int, gen: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image along ``dim`` (-1 horizontal, -2 vertical) with probability p."""
    mask = _rand(x.shape[0], gen, x) < p
    return torch.where(_per_image(mask), x.flip(dim), x)


def affine(
    x: torch.Tensor,
    gen: torch.Generator,
    *,
    rotation: float = 0.0,
    scale: tuple[float, float] | None = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Random rotation (±``rotation`` degrees) and/or random resized crop.

    Random resized crop: a box of area fraction in ``scale`` and aspect ratio in
    ``ratio`` (log-uniform), clipped to the image, placed at random and resized
    to the full size. Both are one ``grid_sample`` (bilinear, zero fill).
    """
    b, _, h, w = x.shape
    x = to_float(x)
    theta = torch.zeros(b, 3, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = theta[:, 2, 2] = 1
    if scale is not None:
        area = scale[0] + (scale[1] - scale[0]) * torch.rand(b, generator=gen)
        lo, hi = math.log(ratio[0]), math.log(ratio[1])
        r = torch.exp(lo + (hi - lo) * torch.rand(b, generator=gen))
        fw = torch.sqrt(area * r * h / w).clamp(max=1.0)  # fraction of the width
        fh = torch.sqrt(area / r * w / h).clamp(max=1.0)
        cx = (1 - fw) * (2 * torch.rand(b, generator=gen) - 1)
        cy = (1 - fh) * (2 * torch.rand(b, generator=gen) - 1)
        crop = torch.zeros(b, 3, 3)
        crop[:, 0, 0], crop[:, 0, 2] = fw, cx
        crop[:, 1, 1], crop[:, 1, 2] = fh, cy
        crop[:, 2, 2] = 1
        theta = crop
    if rotation > 0:
        a = torch.deg2rad(rotation * (2 * torch.rand(b, generator=gen) - 1))
        cos, sin = torch.cos(a), torch.sin(a)
        rot = torch.zeros(b, 3, 3)
        # rotation in pixel space, written in normalised [-1, 1] coordinates
        rot[:, 0, 0], rot[:, 0, 1] = cos, -sin * h / w
        rot[:, 1, 0], rot[:, 1, 1] = sin * w / h, cos
        rot[:, 2, 2] = 1
        theta = theta @ rot
    grid = F.affine_grid(
        theta[:, :2].to(x.device, x.dtype, non_blocking=True), list(x.shape), align_corners=False
    )
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


# --------------------------------------------------------------------------- colour


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


def color_jitter(x: torch.Tensor, spec: ColorJitter, gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation, hue, each with its own factor per image.

    Factors follow torchvision (uniform in [1-v, 1+v]; hue shift in [-h, h] of a
    turn). Hue is a rotation about the grey axis in YIQ space: a batched linear
    approximation of torchvision's HSV hue shift. Saturation and hue are skipped
    for 1-channel images. Fixed order (torchvision shuffles it).
    """
    x = to_float(x)
    b = x.shape[0]

    def factor(v: float) -> torch.Tensor:
        return _uniform(b, max(0.0, 1 - v), 1 + v, gen, x).view(b, 1, 1, 1)

    if spec.brightness > 0:
        x = (x * factor(spec.brightness)).clamp_(0, 1)
    if spec.contrast > 0:
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        x = (mean + factor(spec.contrast) * (x - mean)).clamp_(0, 1)
    if x.shape[1] == 3 and spec.saturation > 0:
        gray = _gray(x)
        x = (gray + factor(spec.saturation) * (x - gray)).clamp_(0, 1)
    if x.shape[1] == 3 and spec.hue > 0:
        x = _hue_rotate(x, _uniform(b, -spec.hue, spec.hue, gen, x) * 2 * math.pi)
    return x


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)  # once, on the host: on CUDA, inv checks its result (a host sync)


def _hue_rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    b = x.shape[0]
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(b, 3, 3, device=x.device, dtype=x.dtype)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    to_yiq = _RGB2YIQ.to(x.device, x.dtype, non_blocking=True)
    to_rgb = _YIQ2RGB.to(x.device, x.dtype, non_blocking=True)
    m = to_rgb @ rot @ to_yiq  # (B, 3, 3)
    return torch.einsum("bij,bjhw->bihw", m, x).clamp_(0, 1)


# --------------------------------------------------------------------------- auto augment


def auto_augment(
    x: torch.Tensor, policy: Callable[[torch.Tensor], torch.Tensor], gen: torch.Generator
) -> torch.Tensor:
    """Apply a torchvision auto-augment policy to each image separately.

    torchvision's TrivialAugmentWide / RandAugment pick one op (and magnitude)
    per call and apply it to the whole batch; we call them per image so each
    image gets its own op, as in the papers. That is B small calls (about 0.1
    ms each at 32x32), acceptable next to a training step. Their randomness
    comes from torch's global RNG, so each batch runs under a forked RNG seeded
    from ``gen``: reproducible, and the global RNG is left untouched.
    """
    u8 = x if x.dtype == torch.uint8 else (x * 255).round_().clamp_(0, 255).to(torch.uint8)
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU's only: fork_rng restores no other
        out = torch.stack([policy(img) for img in u8])
    return out


# --------------------------------------------------------------------------- erasing


def random_erasing(
    x: torch.Tensor,
    p: float,
    gen: torch.Generator,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> torch.Tensor:
    """With probability ``p`` per image, fill a random box with a random colour.

    Box area and aspect ratio are drawn as in torchvision's RandomErasing (and
    clipped to the image); the fill is one random colour per image.
    """
    x = to_float(x)
    b, c, h, w = x.shape
    area = _uniform(b, *scale, gen, x) * h * w
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    r = torch.exp(_uniform(b, lo, hi, gen, x))
    eh = torch.sqrt(area * r).round().clamp(1, h)
    ew = torch.sqrt(area / r).round().clamp(1, w)
    y0 = (_rand(b, gen, x) * (h - eh + 1)).floor()
    x0 = (_rand(b, gen, x) * (w - ew + 1)).floor()
    on = _rand(b, gen, x) < p
    fill = torch.rand(b, c, generator=gen).to(x.device, x.dtype, non_blocking=True).view(b, c, 1, 1)
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_rows = (rows >= y0[:, None]) & (rows < (y0 + eh)[:, None])  # (B, H)
    in_cols = (cols >= x0[:, None]) & (cols < (x0 + ew)[:, None])  # (B, W)
    mask = (in_rows[:, :, None] & in_cols[:, None, :]) & on.view(b, 1, 1)
    return torch.where(mask[:, None], fill, x)


# --------------------------------------------------------------------------- mixing


def mix_batch(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    mixup_alpha: float,
    cutmix_alpha: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix a float batch; return it with soft targets (rows sum to 1).

    One mixing weight per batch, lambda ~ Beta(alpha, alpha), partner = a random
    permutation of the batch. With both alphas > 0, each batch picks one of the
    two with equal chance. CutMix pastes one box (same for the whole batch)
    and sets lambda to the exact unpasted area.
    """
    # multi-hot rows (multi-label) are already targets; mixing them stays valid for BCE
    soft = y.to(torch.float32) if y.ndim == 2 else F.one_hot(y, num_classes).to(torch.float32)
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return x, soft
    x = to_float(x)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or bool(torch.rand(1, generator=generator) < 0.5))
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    # torch's Beta sampler takes no generator; numpy's does, seeded from ours.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator).to(x.device, non_blocking=True)
    if use_cutmix:
        _, _, h, w = x.shape
        cut = math.sqrt(1 - lam)
        ch, cw = round(h * cut), round(w * cut)
        cy = int(torch.randint(0, h, (1,), generator=generator))
        cx = int(torch.randint(0, w, (1,), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + (ch + 1) // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + (cw + 1) // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    soft = soft.to(x.device, non_blocking=True)
    return x, lam * soft + (1 - lam) * soft[perm]


# --------------------------------------------------------------------------- build


def build_augment(spec: AugmentSpec, size: tuple[int, int] | None = None) -> Augment | None:
    """One function applying every enabled augmentation, or None when none is.

    ``size`` is the (h, w) of the batches (informational: every op keeps the
    input size). Mixup/CutMix are not included: see :func:`mix_batch`.
    """
    steps: list[Augment] = []
    if spec.trivial_augment or spec.randaugment is not None:
        from torchvision.transforms import v2  # heavy import; only when asked

        if spec.trivial_augment:
            trivial = v2.TrivialAugmentWide()
            steps.append(lambda x, g: auto_augment(x, trivial, g))
        if spec.randaugment is not None:
            ra = v2.RandAugment(spec.randaugment.num_ops, spec.randaugment.magnitude)
            steps.append(lambda x, g: auto_augment(x, ra, g))
    if spec.random_crop is not None and spec.random_crop.padding > 0:
        pad = spec.random_crop.padding
        steps.append(lambda x, g: random_crop(x, pad, g))
    rrc = spec.random_resized_crop
    if rrc is not None or spec.rotation > 0:
        steps.append(
            lambda x, g: affine(
                x,
                g,
                rotation=spec.rotation,
                scale=(rrc.scale[0], rrc.scale[1]) if rrc else None,
                ratio=(rrc.ratio[0], rrc.ratio[1]) if rrc else (3 / 4, 4 / 3),
            )
        )
    if spec.hflip:
        steps.append(lambda x, g: flip(x, -1, g))
    if spec.vflip:
        steps.append(lambda x, g: flip(x, -2, g))
    cj = spec.color_jitter
    if cj is not None and (cj.brightness or cj.contrast or cj.saturation or cj.hue):
        steps.append(lambda x, g: color_jitter(x, cj, g))
    if spec.random_erasing > 0:
        steps.append(lambda x, g: random_erasing(x, spec.random_erasing, g))
    if not steps:
        return None

    def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        for step in steps:
            x = step(x, gen)
        return to_float(x)

    return augment
