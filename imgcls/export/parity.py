"""Numerical parity of an export with the PyTorch model it came from.

PyTorch and the exported file run on the same images in the same batches;
:func:`compare` holds the export to PyTorch's eval-mode logits within
:class:`Tolerance`, which widens per image by PyTorch's own float32 error
(measured against the model in float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """How far an export's outputs may drift from PyTorch's and still pass.

    The exported graph runs other kernels (onnxruntime fuses conv+batchnorm,
    sums in another order, picks other conv algorithms), so bitwise equality
    is not expected. float32 rounding is ~6e-8 per operation and grows with
    the size of the terms summed, not of the result; through ~100 layers of
    sums of 1e3-1e4 terms it stays near 1e-5 of the activations' scale. So:

    - logits: ``|export - torch| <= logit_atol + logit_rtol * max|torch logits|
      + fp32_factor * |torch - torch in float64|`` per image. The relative
      part is scaled by the image's largest logit (a near-zero logit
      inherits the rounding of its large neighbours); 1e-3 leaves ~100x
      headroom over honest rounding, while real export bugs (batchnorm in
      train mode, a dropped layer, wrong padding, a graph frozen to the
      example batch) give errors of order 1. ``logit_atol`` covers rows
      whose logits are all near zero (untrained heads).
    - the last term is PyTorch's own float32 error on that image: the
      largest ``|torch float32 - torch float64|`` logit of the image over
      PyTorch's runs at every batch size checked (other batch sizes run
      other kernels, so two samples of that error rather than one). A
      well-conditioned model's is ~1e-6 of its logits and changes nothing.
      An ill-conditioned one amplifies rounding. Two float32 runs each within
      e of the exact answer can be 2e apart; ``fp32_factor`` = 4 allows that
      twice over, and is still far below the order-1 relative errors of real
      bugs in a well-conditioned model.
    - it stays per image, never a batch-wide maximum: conditioning differs
      by orders of magnitude between images of one batch. Measured on
      torchvision models at 64x64, 5 classes, random weights with batchnorm
      statistics taken from noise, check batch = 4 shapes images + 4 uniform
      noise images (float32 error of batch size 1 / 3 vs float64):
      efficientnet_b5's shapes images have logits ~2 and errors < 1e-5, its
      noise images logits 7e3-3e4 and errors 40-3443 (0.6-14%); the ONNX
      export's errors there are 78-1636 (1-5%), as accurate as PyTorch. On
      efficientnet_b6 one image (logits 2.1, error 2e-6) shares the batch
      with one whose error is 6e6; a batch-wide bound would let the first be
      off by 2e7 and hide any export bug on it.
    - probabilities (softmax): ``prob_atol`` absolute, i.e. the first four
      decimals a person reads in ``imgcls predict`` are the same; or, if
      larger, ``fp32_factor`` times PyTorch's own float32 error in them, or
      the logit slack ``fp32_factor * e`` (capped at 1), since softmax moves
      no probability by more than the largest logit change. The latter
      matters when huge logits make softmax one-hot: float32 and float64
      then agree on the probabilities exactly (error 0) even where the
      logit error exceeds the top-2 margin, and a flip moves a
      probability by 1.
    - top-1: identical on every image, unless the image's top-2 margin (the
      smaller of PyTorch float32's and float64's) is within twice its logit
      tolerance (a near-tie that rounding may flip), or PyTorch's own float32
      runs pick another top-1 than float64 (rounding already decides it).
      Such images are counted in ``ParityCheck.top1_unjudged``; their logits
      are still held to the bound above. efficientnet_b6/b7 as above are so
      ill-conditioned that float32 errors reach the logits themselves (b7:
      0.4-1.5x the image's largest logit on all 8 images; PyTorch float32
      agrees with float64's top-1 on 3 of 8); there no float32 program can
      be told right from wrong by its top-1, and :func:`export_model` says
      so in a note rather than fail an export that is as close to float64
      as PyTorch is (ONNX 0.3-1.7x, top-1 right on 4 of 8).
    """

    logit_rtol: float = 1e-3
    logit_atol: float = 1e-4
    prob_atol: float = 1e-4
    fp32_factor: float = 4.0


TOLERANCE = Tolerance()


@dataclass
class ParityCheck:
    """One comparison of the export with PyTorch at one batch size."""

    batch_size: int
    images: int
    max_logit_diff: float
    max_prob_diff: float
    top1_agree: int
    ok: bool
    problem: str = ""
    torch_fp32_error: float = 0.0  # max |PyTorch float32 - PyTorch float64| logit on these images
    top1_unjudged: int = 0  # images whose top-1 PyTorch float32 itself cannot settle (see Tolerance)


def reference_logits(model, x):
    """PyTorch's eval-mode logits for ``x``: what every export is held to."""
    import torch

    from imgcls.forward import main_logits

    with torch.no_grad():
        return main_logits(model.eval()(x))


def parity_checks(model, exported, x, sizes: Sequence[int], tol: Tolerance) -> list[ParityCheck]:
    """Run PyTorch and the export on ``x`` in the same batches of each size; compare.

    Like for like: PyTorch's own outputs shift with the batch size (other
    kernels, other summation order), so each batch size gets its own
    reference rather than one computed at another size; PyTorch's runs at
    the other sizes still enter each image's float32 error estimate.
    """
    import torch

    exact = exact_logits(model, x)
    runs = []
    for size in sizes:
        # pad to whole batches by repeating images (a static export needs full ones)
        n = -(-len(x) // size) * size
        index = [i % len(x) for i in range(n)]
        batches = [x[index[i : i + size]] for i in range(0, n, size)]
        ref = torch.cat([reference_logits(model, b) for b in batches])[: len(x)]
        runs.append((size, batches, ref))
    checks = []
    for size, batches, ref in runs:
        try:
            got = torch.cat([exported(b) for b in batches])[: len(x)]
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            checks.append(
                ParityCheck(size, len(x), float("inf"), float("inf"), 0, False, f"batch {size}: {first}")
            )
            continue
        others = [r for s, _, r in runs if s != size]
        checks.append(compare(ref, got, size, tol, exact, others))
    return checks


def exact_logits(model, x):
    """The model's logits for ``x`` computed in float64 (a copy of the model),
    the yardstick for PyTorch's own float32 rounding; None if it cannot run
    in float64."""
    import copy

    try:
        wide = copy.deepcopy(model).double()
        return reference_logits(wide, x.double())
    except Exception:  # an op without a float64 kernel: fall back to the fixed tolerance
        return None


def compare(ref, got, batch_size: int, tol: Tolerance, exact=None, fp32_runs=()) -> ParityCheck:
    """Compare logits ``got`` with the reference ``ref`` (both N x classes);
    ``exact``, the float64 logits, widens the tolerance by PyTorch's own
    float32 error on each image, measured on ``ref`` and on any other float32
    runs of the same images given in ``fp32_runs`` (e.g. at other batch
    sizes); see :class:`Tolerance`."""
    import torch

    ref, got = ref.double(), got.double()
    if got.shape != ref.shape:
        return ParityCheck(
            batch_size, len(ref), float("inf"), float("inf"), 0, False,
            f"batch {batch_size}: output shape {tuple(got.shape)}, expected {tuple(ref.shape)}",
        )  # fmt: skip
    if not torch.isfinite(got).all():
        return ParityCheck(
            batch_size,
            len(ref),
            float("inf"),
            float("inf"),
            0,
            False,
            f"batch {batch_size}: non-finite outputs",
        )
    diff = (got - ref).abs()
    allowed = tol.logit_atol + tol.logit_rtol * ref.abs().amax(dim=1, keepdim=True)
    prob_allowed = torch.full((len(ref), 1), tol.prob_atol, dtype=torch.float64)
    fp32_error = torch.zeros(len(ref), 1, dtype=torch.float64)
    margin = _top2_margin(ref)
    lost = torch.zeros(len(ref), dtype=torch.bool)  # PyTorch float32 itself picks another top-1
    if exact is not None and exact.shape == ref.shape:
        exact = exact.double()
        runs = [ref, *(r.double() for r in fp32_runs if r.shape == ref.shape)]
        fp32_error = torch.stack([(r - exact).abs().amax(dim=1) for r in runs]).amax(0)[:, None]
        allowed = allowed + tol.fp32_factor * fp32_error
        prob_error = torch.stack([(r.softmax(1) - exact.softmax(1)).abs().amax(dim=1) for r in runs]).amax(0)[
            :, None
        ]
        # softmax moves no probability by more than the largest logit change
        # (its Jacobian's inf-norm is <= 1/2 of a logit range <= 2 max|dz|),
        # so a logit slack of fp32_factor * fp32_error is the same in probabilities
        prob_allowed = torch.maximum(
            prob_allowed,
            torch.maximum(tol.fp32_factor * prob_error, (tol.fp32_factor * fp32_error).clamp(max=1.0)),
        )
        margin = torch.minimum(margin, _top2_margin(exact))
        lost = torch.stack([r.argmax(1) != exact.argmax(1) for r in runs]).any(0)
    prob_diff = (got.softmax(1) - ref.softmax(1)).abs()
    top1_ref, top1_got = ref.argmax(1), got.argmax(1)
    # a near-tie that rounding may flip, or an image whose top-1 PyTorch float32 itself gets wrong
    unjudged = (margin <= 2 * allowed[:, 0]) | lost
    agree = top1_ref == top1_got
    check = ParityCheck(
        batch_size=batch_size,
        images=len(ref),
        max_logit_diff=float(diff.max()),
        max_prob_diff=float(prob_diff.max()),
        top1_agree=int(agree.sum()),
        ok=True,
        torch_fp32_error=float(fp32_error.max()),
        top1_unjudged=int(unjudged.sum()) if ref.shape[1] > 1 else 0,
    )
    worst = int((diff - allowed).amax(dim=1).argmax())
    worst_prob = int((prob_diff.amax(dim=1, keepdim=True) - prob_allowed).argmax())
    if bool((diff > allowed).any()):
        check.ok = False
        check.problem = (
            f"batch {batch_size}: logits differ by up to {float(diff[worst].max()):.3g}, "
            f"allowed {float(allowed[worst]):.3g} (image {worst})"
        )
    elif bool((prob_diff.amax(dim=1, keepdim=True) > prob_allowed).any()):
        check.ok = False
        check.problem = (
            f"batch {batch_size}: probabilities differ by up to {float(prob_diff[worst_prob].max()):.3g}, "
            f"allowed {float(prob_allowed[worst_prob]):.3g} (image {worst_prob})"
        )
    elif bool((~agree & ~unjudged).any()):
        check.ok = False
        check.problem = (
            f"batch {batch_size}: top-1 class differs on {int((~agree).sum())} of {len(ref)} images"
        )
    return check


def _top2_margin(logits):
    """Each row's largest logit minus its second largest (0 for one class)."""
    if logits.shape[1] < 2:
        return logits.new_zeros(len(logits))
    top2 = logits.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]
