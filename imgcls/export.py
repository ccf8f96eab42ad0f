"""Export a checkpoint to ONNX, TorchScript or plain safetensors, parity-checked.

Every export is written to a temporary file beside the target, loaded back
the way a consumer would load it (onnxruntime, ``torch.jit.load``,
``safetensors``), run on check images and compared with the PyTorch model in
eval mode; only an export that agrees is renamed into place. One that does
not is an :class:`ImgclsError` and leaves no file behind.

The file carries what a consumer needs to feed it: class names in index
order, input shape, channels, mean/std and resize policy (the checkpoint's
``preprocessing``), as one JSON document under the key ``imgcls``: in ONNX
``metadata_props``, in TorchScript the extra file ``imgcls.json``, in
safetensors the header metadata (beside the checkpoint's own ``imgcls`` key,
so the exported weights are also a loadable imgcls checkpoint).

:func:`load_exported` opens such a file for inference; for ONNX it needs only
onnxruntime, never the torch model.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgcls.errors import CheckpointError, ImgclsError, UsageError

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts"), "safetensors": (".safetensors",)}
EXPORT_FORMAT = "imgcls-export"
EXPORT_VERSION = 1
META_KEY = "imgcls"  # ONNX metadata_props key / safetensors header key
TS_META_FILE = "imgcls.json"  # TorchScript _extra_files name
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_MISSING = "ONNX export needs onnx and onnxruntime: pip install 'imgcls[onnx]'"
NOISE_IMAGES = 4  # synthetic check images (always)
DATA_IMAGES = 4  # check images taken from the run's own data, when it is on disk
MAX_CHECK_IMAGES = 16


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


@dataclass
class ExportResult:
    path: Path
    format: str
    source: Path  # the checkpoint exported
    exporter: str  # e.g. "torch.onnx (dynamo)", "torch.jit.trace", "safetensors"
    opset: int | None
    dynamic_batch: bool
    batch_size: int | None  # the fixed batch size of a --static-batch export
    check_images: dict[str, int]  # how many of each kind: given, data, noise
    checks: list[ParityCheck] = field(default_factory=list)
    seconds: float = 0.0
    tolerance: Tolerance = TOLERANCE

    def to_dict(self) -> dict:
        out = asdict(self)
        out["path"], out["source"] = str(self.path), str(self.source)
        return out


# --------------------------------------------------------------------------- export


def default_out(checkpoint: Path, fmt: str, in_run: bool) -> Path:
    """``<run>/model.onnx`` for a run's checkpoint, else ``<stem>.onnx`` beside the file."""
    suffix = SUFFIXES[fmt][0]
    out = checkpoint.with_name(f"model{suffix}" if in_run else f"{checkpoint.stem}{suffix}")
    if out == checkpoint:  # safetensors next to a loose safetensors checkpoint
        out = checkpoint.with_name(f"{checkpoint.stem}.export{suffix}")
    return out


def format_from_suffix(path: Path) -> str | None:
    return next((fmt for fmt, sufs in SUFFIXES.items() if path.suffix.lower() in sufs), None)


def export_model(
    target: str | Path,
    fmt: str | None = None,
    out: Path | None = None,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    batch_size: int = 1,
    force: bool = False,
    images: Sequence[Path] = (),
    log: Callable[[str], None] = lambda message: None,
) -> ExportResult:
    """Export the checkpoint ``target`` (file, run folder, runs/<name>) as ``fmt``.

    ``dynamic_batch`` leaves the batch axis free (checked at batch 1 and 3);
    otherwise the file takes exactly ``batch_size`` images (checked at that
    size). ``images`` are extra check images (files or folders). An existing
    ``out`` is replaced only with ``force``, and only once the new export
    has passed its check.
    """
    from imgcls.checkpoint import load_checkpoint

    started = time.perf_counter()
    if out is not None and fmt is None:
        fmt = format_from_suffix(Path(out))
    if fmt is None:
        raise UsageError("give --format (onnx, torchscript or safetensors)")
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()
    if batch_size < 1:
        raise UsageError("the batch size must be at least 1")
    if opset is not None and fmt != "onnx":
        raise UsageError("--opset applies to --format onnx only")

    ckpt = load_checkpoint(target)
    out = Path(out).expanduser() if out is not None else default_out(ckpt.path, fmt, ckpt.run_dir is not None)
    if out.suffix.lower() not in SUFFIXES[fmt]:
        raise UsageError(f"{out}: a {fmt} export must end in {' or '.join(SUFFIXES[fmt])}")
    if out.resolve() == ckpt.path.resolve():
        raise UsageError(f"{out}: that is the checkpoint itself; choose another --out")
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; give a file name")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to replace it, or choose another --out")

    x, counts = check_batch(ckpt, images)
    model = ckpt.model.eval()
    meta = export_meta(ckpt, None if dynamic_batch or fmt == "safetensors" else batch_size)
    result = ExportResult(
        path=out,
        format=fmt,
        source=ckpt.path,
        exporter="",
        opset=None,
        dynamic_batch=dynamic_batch if fmt != "safetensors" else True,
        batch_size=None if dynamic_batch or fmt == "safetensors" else batch_size,
        check_images=counts,
    )
    sizes = [1, 3] if dynamic_batch or fmt == "safetensors" else [batch_size]
    log(f"exporting {ckpt.path} as {fmt} to {out}")
    ref = reference_logits(model, x)
    if float((ref - ref.mean(0)).abs().max()) < 1e-6:
        log("note: the model's outputs do not depend on the input (untrained?), so the check proves little")

    from imgcls.checkpoint import atomic_path

    with atomic_path(out) as tmp:
        if fmt == "onnx":
            result.exporter, result.opset = write_onnx(
                model, tmp, meta, x, opset, dynamic_batch, batch_size, log
            )
        elif fmt == "torchscript":
            result.exporter = write_torchscript(model, tmp, meta, x, dynamic_batch, batch_size)
        else:
            result.exporter = write_safetensors(ckpt.path, tmp, meta)
        log(f"checking against PyTorch on {len(x)} images at batch size {' and '.join(map(str, sizes))}")
        exported = load_exported(tmp, kind=fmt)
        result.checks = parity_checks(model, exported, x, sizes, TOLERANCE)
        fp32_error, scale = max(c.torch_fp32_error for c in result.checks), float(ref.abs().max())
        if fp32_error > 1e-4 * scale:
            log(
                f"note: this model amplifies rounding: PyTorch's own float32 logits are off by up to "
                f"{fp32_error:.3g} (largest logit {scale:.3g}) from float64; the export is held to that"
            )
        unjudged = max(c.top1_unjudged for c in result.checks)
        if unjudged and fp32_error > 1e-4 * scale:
            log(
                f"note: on {unjudged} of {len(x)} check images PyTorch's own float32 error covers the "
                f"top-2 margin, so the top-1 class there is decided by rounding and was not compared"
                + ("; check this export on real images (--image)" if unjudged == len(x) else "")
            )
        failed = [c for c in result.checks if not c.ok]
        if failed:
            raise ImgclsError(
                f"the {fmt} export does not match PyTorch ({failed[0].problem}); nothing was written"
            )
        if exported.meta != meta:
            raise ImgclsError(f"the {fmt} export lost its metadata on reload; nothing was written")
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def export_meta(ckpt, batch_size: int | None = None) -> dict:
    """The JSON document stored inside every export (``batch_size``: None
    for a free batch axis, else the one size the file accepts)."""
    return {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "classes": list(ckpt.classes),
        "preprocessing": dict(ckpt.preprocessing),
        "input_shape": list(ckpt.meta["input_shape"]),
        "input": INPUT_NAME,
        "output": OUTPUT_NAME,
        "batch_size": batch_size,
        "model": ckpt.meta.get("recipe", {}).get("model"),
    }


def logits_module(model, x):
    """``model`` itself, or, when its forward returns a tuple / namedtuple
    (googlenet or inception_v3 built with aux heads), a wrapper module whose
    forward returns only :func:`imgcls.models.build.main_logits` of it (the
    exporters need an ``nn.Module`` with one tensor output)."""
    import torch

    from imgcls.models.build import main_logits

    with torch.no_grad():
        y = model(x[:2])
    if isinstance(y, torch.Tensor):
        return model

    class MainLogits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return main_logits(self.inner(x))

    return MainLogits(model).eval()


def example_input(x, dynamic_batch: bool, batch_size: int):
    """The tracing example: 2 images for a free batch axis (torch.export
    specialises a size-1 axis to a constant), else exactly ``batch_size``."""
    n = 2 if dynamic_batch else batch_size
    return x[[i % len(x) for i in range(n)]]


def write_onnx(
    model,
    path: Path,
    meta: dict,
    x,
    opset: int | None,
    dynamic_batch: bool,
    batch_size: int,
    log: Callable[[str], None] = lambda message: None,
):
    """ONNX through ``torch.onnx.export(dynamo=True)``, the exporter torch
    2.9+ defaults to and maintains (the TorchScript-based one warns that it
    is deprecated). Should it fail on a model, the TorchScript-based exporter
    is tried before giving up, since it still covers graphs torch.export
    cannot capture. Returns (exporter used, opset)."""
    import onnx

    model = logits_module(model, x)
    example = example_input(x, dynamic_batch, batch_size)
    errors = []
    proto = None
    for dynamo in (True, False):
        try:
            proto = _onnx_proto(model, example, opset, dynamic_batch, dynamo)
            exporter = "torch.onnx (dynamo)" if dynamo else "torch.onnx (torchscript)"
            break
        except Exception as exc:  # the exporters raise many types; report the first line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            errors.append(
                f"{'dynamo' if dynamo else 'torchscript'} exporter: {type(exc).__name__}: {first}"[:400]
            )
            if dynamo:
                log(f"the dynamo ONNX exporter failed ({errors[-1]}); trying the TorchScript-based one")
    if proto is None:
        raise ImgclsError(f"torch.onnx cannot export this model ({'; '.join(errors)})")
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    proto.producer_name = "imgcls"
    proto.doc_string = (
        f"imgcls classifier: {len(meta['classes'])} classes, input {INPUT_NAME} NCHW float32 normalized"
    )
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ImgclsError(f"the ONNX graph is invalid: {exc}") from None
    onnx.save(proto, str(path))
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return exporter, opset_used


def _onnx_proto(model, example, opset: int | None, dynamic_batch: bool, dynamo: bool):
    import io

    import onnx
    import torch

    kwargs: dict[str, Any] = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "verbose": False}
    if opset is not None:
        kwargs["opset_version"] = opset
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and tracer chatter; the parity check judges
        if dynamo:
            if dynamic_batch:
                kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=65536)},)
            program = torch.onnx.export(model, (example,), None, dynamo=True, optimize=True, **kwargs)
            return program.model_proto
        if dynamic_batch:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        buffer = io.BytesIO()
        torch.onnx.export(model, (example,), buffer, dynamo=False, **kwargs)
        return onnx.load_from_string(buffer.getvalue())


def write_torchscript(model, path: Path, meta: dict, x, dynamic_batch: bool, batch_size: int) -> str:
    """TorchScript by tracing (plain nn.Modules, torchvision's included, trace
    cleanly; scripting rejects much ordinary Python). torch 2.10+ marks
    torch.jit deprecated with a FutureWarning; it still works, is still what
    C++ libtorch and older runtimes load, and the warnings are silenced here.
    Tracer warnings are silenced too: the parity check at a second batch size
    catches what they warn about (shapes frozen into the graph)."""
    import torch

    model = logits_module(model, x)
    example = example_input(x, dynamic_batch, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.no_grad():
                traced = torch.jit.trace(model, example, check_trace=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise ImgclsError(
                f"torch.jit.trace cannot export this model ({type(exc).__name__}: {first})"
            ) from None
        torch.jit.save(traced, str(path), _extra_files={TS_META_FILE: json.dumps(meta)})
    return "torch.jit.trace"


def write_safetensors(checkpoint: Path, path: Path, meta: dict) -> str:
    """The checkpoint's own tensors, byte for byte, with its metadata plus the
    export document: for consumers with their own model code."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(checkpoint), framework="pt") as f:
        header = dict(f.metadata() or {})
    header[f"{META_KEY}.export"] = json.dumps(meta)
    save_file(load_file(str(checkpoint)), str(path), metadata=header)
    return "safetensors"


# --------------------------------------------------------------------------- check images


def check_batch(ckpt, images: Sequence[Path] = ()):
    """Normalised float images to check an export on, and how many of each kind.

    Given images first (files, or the image files in given folders), then a
    few of the run's own images when its data is on disk, then deterministic
    noise (always, so a checkpoint with no data around is still checked).
    """
    import torch

    from imgcls.data.decode import load_image
    from imgcls.data.loader import normalize

    pre = ckpt.preprocessing
    channels, (h, w) = int(pre["channels"]), tuple(pre["image_size"])
    given = list_images(images, MAX_CHECK_IMAGES)
    if images and not given:
        raise UsageError(f"no image files in {', '.join(map(str, images))}")
    data = data_images(ckpt, DATA_IMAGES) if not given else []
    pixels = [load_image(p, channels, (h, w), pre.get("resize", "stretch")) for p in [*given, *data]]
    gen = torch.Generator().manual_seed(0)
    pixels += list(torch.randint(0, 256, (NOISE_IMAGES, channels, h, w), generator=gen, dtype=torch.uint8))
    x = normalize(torch.stack(pixels), pre["mean"], pre["std"])
    return x, {"given": len(given), "data": len(data), "noise": NOISE_IMAGES}


def list_images(paths: Sequence[Path], limit: int) -> list[Path]:
    from imgcls.data.decode import IMAGE_EXTENSIONS

    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
            )[: limit - len(found)]
        elif path.exists():
            found.append(path)
        else:
            raise UsageError(f"{path}: no such image file or folder")
    return found[:limit]


def data_images(ckpt, limit: int) -> list[Path]:
    """A few images of the run's own data, if it is where the recipe says
    (the built-in shapes set in the cache, or a folder); never writes anything."""
    data = (ckpt.meta.get("recipe") or {}).get("data") or {}
    try:
        if data.get("source") == "shapes" and not data.get("path"):
            from imgcls.data.shapes import is_complete, shapes_dir
            from imgcls.recipe import ShapesSpec

            spec = ShapesSpec(**(data.get("shapes") or {}))
            root = shapes_dir(spec)
            if not is_complete(root, spec):
                return []
        elif data.get("path"):
            root = Path(data["path"]).expanduser()
            if not root.is_absolute() and ckpt.run_dir is not None and not root.exists():
                return []
            if not root.is_dir():
                return []
        else:
            return []
        per_class = [
            sorted(d.iterdir()) for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")
        ]
        picks = [files[0] for files in per_class if files]  # one per class, then the rest
        return list_images(picks, limit)
    except (OSError, ValueError, TypeError):
        return []


# --------------------------------------------------------------------------- parity


def reference_logits(model, x):
    """PyTorch's eval-mode logits for ``x``: what every export is held to."""
    import torch

    from imgcls.models.build import main_logits

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


# --------------------------------------------------------------------------- loading


def require_onnx():
    """Import onnx and onnxruntime, or say in one line how to get them."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UsageError(ONNX_MISSING) from None
    return onnx, onnxruntime


@dataclass
class ExportedModel:
    """An exported classifier ready for inference.

    ``model(x)`` takes a float32 NCHW tensor, normalised with
    ``preprocessing['mean'/'std']``, and returns the logits (N x classes).
    """

    path: Path
    meta: dict
    kind: str  # "onnx", "torchscript" or "safetensors"
    runner: Callable[[Any], Any]
    batch_size: int | None = None  # a static export's fixed batch size

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def preprocessing(self) -> dict:
        return self.meta["preprocessing"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_shape"])

    def __call__(self, x):
        import torch

        x = x.detach().to("cpu", torch.float32).contiguous()
        fixed = self.batch_size
        if fixed is None or len(x) == fixed:
            return self.runner(x)
        # a static-batch file: feed whole batches, padding the last with copies
        n = len(x)
        index = [i % n for i in range(-(-n // fixed) * fixed)]
        parts = [self.runner(x[index[i : i + fixed]]) for i in range(0, len(index), fixed)]
        return torch.cat(parts)[:n]


def load_exported(path: str | Path, kind: str | None = None) -> ExportedModel:
    """Open an export (.onnx, .pt/.ts, .safetensors) for inference.

    ``kind`` overrides the guess from the suffix. ONNX runs in onnxruntime on
    the CPU without building the torch model; TorchScript through
    ``torch.jit.load``; safetensors rebuilds the model from its recipe.
    """
    path = Path(path).expanduser()
    kind = kind or format_from_suffix(path)
    if kind is None:
        raise UsageError(f"{path}: not an export (.onnx, .pt, .ts or .safetensors)")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if kind == "onnx":
        return _load_onnx(path)
    if kind == "torchscript":
        return _load_torchscript(path)
    return _load_safetensors(path)


def _read_meta(path: Path, raw: str | bytes | None) -> dict:
    if not raw:
        raise CheckpointError(f"{path}: no imgcls metadata (not exported by imgcls)")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CheckpointError(f"{path}: unreadable imgcls metadata") from None
    if meta.get("format") != EXPORT_FORMAT or meta.get("version", 0) > EXPORT_VERSION:
        raise CheckpointError(f"{path}: export format {meta.get('version')} is not one this imgcls reads")
    return meta


def _load_onnx(path: Path) -> ExportedModel:
    _, ort = require_onnx()
    import numpy as np

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CheckpointError(
            f"{path}: onnxruntime cannot load it ({str(exc).strip().splitlines()[0]})"
        ) from None
    meta = _read_meta(path, session.get_modelmeta().custom_metadata_map.get(META_KEY))
    first = session.get_inputs()[0]
    input_name, output_name = first.name, session.get_outputs()[0].name
    batch = first.shape[0] if isinstance(first.shape[0], int) else None

    def run(x):
        import torch

        (y,) = session.run([output_name], {input_name: np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        return torch.from_numpy(y)

    return ExportedModel(path, meta, "onnx", run, batch)


def _load_torchscript(path: Path) -> ExportedModel:
    import torch

    files = {TS_META_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is marked deprecated in 2.10+
        try:
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=files)
        except Exception as exc:
            raise CheckpointError(
                f"{path}: not a TorchScript file ({str(exc).strip().splitlines()[0]})"
            ) from None
    meta = _read_meta(path, files[TS_META_FILE])
    module.eval()
    batch = meta.get("batch_size")

    def run(x):
        with torch.no_grad():
            return module(x)

    return ExportedModel(path, meta, "torchscript", run, batch)


def _load_safetensors(path: Path) -> ExportedModel:
    import torch
    from safetensors import safe_open

    from imgcls.checkpoint import load_checkpoint

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(f"{META_KEY}.export")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if raw is None:  # a plain checkpoint works too
        ckpt = load_checkpoint(path)
        from types import SimpleNamespace

        meta = export_meta(
            SimpleNamespace(classes=ckpt.classes, preprocessing=ckpt.preprocessing, meta=ckpt.meta)
        )
    else:
        meta = _read_meta(path, raw)
        ckpt = load_checkpoint(path)
    from imgcls.models.build import main_logits

    model = ckpt.model.eval()

    def run(x):
        with torch.no_grad():
            return main_logits(model(x))

    return ExportedModel(path, meta, "safetensors", run)
