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

The exported file is loaded back with :mod:`imgcls.export.runtime` and
checked with :mod:`imgcls.export.parity`.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from imgcls.errors import ImgclsError, UsageError
from imgcls.export.parity import TOLERANCE, ParityCheck, Tolerance, parity_checks, reference_logits
from imgcls.export.runtime import (
    FORMATS,
    INPUT_NAME,
    META_KEY,
    OUTPUT_NAME,
    SUFFIXES,
    TS_META_FILE,
    export_meta,
    format_from_suffix,
    load_exported,
    require_onnx,
)

NOISE_IMAGES = 4  # synthetic check images (always)
DATA_IMAGES = 4  # check images taken from the run's own data, when it is on disk
MAX_CHECK_IMAGES = 16


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
    quantization: dict | None = None  # an int8 export: how, and its accuracy gate (export.quantize)

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


def _check_format(fmt: str | None, out: Path | None, opset: int | None, batch_size: int) -> str:
    """The export format (from --out's suffix when not given), checked with its options."""
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
    return fmt


def _check_out(out: Path | None, fmt: str, ckpt, force: bool) -> Path:
    """The file to write: never the checkpoint, a folder, a file in a missing
    or read-only folder, or (without --force) an existing file."""
    out = out if out is not None else default_out(ckpt.path, fmt, ckpt.run_dir is not None)
    if out.suffix.lower() not in SUFFIXES[fmt]:
        raise UsageError(f"{out}: a {fmt} export must end in {' or '.join(SUFFIXES[fmt])}")
    if out.resolve() == ckpt.path.resolve():
        raise UsageError(f"{out}: that is the checkpoint itself; choose another --out")
    if out.exists() and not out.is_dir() and not force:
        raise UsageError(f"{out}: already exists; pass --force to replace it, or choose another --out")
    from imgcls.checkpoint import check_out_file

    check_out_file(out)  # a folder, a missing or read-only parent: refused before the export
    return out


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
    quantize: str | None = None,
    calibrate: int | None = None,
    max_drop: float | None = None,
) -> ExportResult:
    """Export the checkpoint ``target`` (file, run folder, runs/<name>) as ``fmt``.

    ``dynamic_batch`` leaves the batch axis free (checked at batch 1 and 3);
    otherwise the file takes exactly ``batch_size`` images (checked at that
    size). ``images`` are extra check images (files or folders). An existing
    ``out`` is replaced only with ``force``, and only once the new export
    has passed its check.

    ``quantize="int8"`` (ONNX only) writes a statically quantized file,
    calibrated on ``calibrate`` training images and kept only if its
    accuracy drops by at most ``max_drop`` points (or with ``force``): see
    :mod:`imgcls.export.quantize`.
    """
    from imgcls.checkpoint import load_checkpoint
    from imgcls.export.quantize import check_quantize_options, default_int8_out, run_images

    started = time.perf_counter()
    fmt = _check_format(fmt, out, opset, batch_size)
    calibrate_n, allowed_drop = check_quantize_options(fmt, quantize, calibrate, max_drop)
    ckpt = load_checkpoint(target)
    if out is None and quantize:
        out = default_int8_out(default_out(ckpt.path, fmt, ckpt.run_dir is not None))
    out = _check_out(Path(out).expanduser() if out is not None else None, fmt, ckpt, force)
    int8_images = run_images(ckpt, calibrate_n) if quantize else None

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

    from imgcls import interrupts
    from imgcls.io import atomic_path

    interrupts.check()  # a Ctrl-C that compiled code swallowed: nothing written yet
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
        if int8_images is not None:
            from imgcls.export.quantize import quantize_checked

            result.quantization = quantize_checked(
                ckpt, tmp, tmp, meta,
                images=int8_images, max_drop=allowed_drop, force=force,
                batch_size=result.batch_size, log=log,
            )  # fmt: skip
        interrupts.check()  # one swallowed while exporting: the file is not put in place
    result.seconds = round(time.perf_counter() - started, 3)
    return result


def logits_module(model, x):
    """``model`` itself, or, when its forward returns a tuple / namedtuple
    (googlenet or inception_v3 built with aux heads), a wrapper module whose
    forward returns only :func:`imgcls.forward.main_logits` of it (the
    exporters need an ``nn.Module`` with one tensor output)."""
    import torch

    from imgcls.forward import main_logits

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
            program: Any = torch.onnx.export(model, (example,), None, dynamo=True, optimize=True, **kwargs)
            return program.model_proto  # an ONNXProgram: dynamo=True always returns one
        if dynamic_batch:
            kwargs["dynamic_axes"] = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
        buffer = io.BytesIO()
        torch.onnx.export(model, (example,), buffer, dynamo=False, **kwargs)  # type: ignore[arg-type]  # a file object is documented, the stub says path only
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

    from imgcls.data.inputs import load_input
    from imgcls.forward import model_input

    pre = ckpt.preprocessing
    channels, (h, w) = int(pre["channels"]), tuple(pre["image_size"])
    given = list_images(images, MAX_CHECK_IMAGES)
    if images and not given:
        raise UsageError(f"no image files in {', '.join(map(str, images))}")
    data = data_images(ckpt, DATA_IMAGES) if not given else []
    pixels = [load_input(p, pre) for p in [*given, *data]]
    gen = torch.Generator().manual_seed(0)
    pixels += list(torch.randint(0, 256, (NOISE_IMAGES, channels, h, w), generator=gen, dtype=torch.uint8))
    x = model_input(torch.stack(pixels), pre["mean"], pre["std"])
    return x, {"given": len(given), "data": len(data), "noise": NOISE_IMAGES}


def list_images(paths: Sequence[Path], limit: int) -> list[Path]:
    """The first ``limit`` images of ``paths`` (files as given, folders walked)."""
    from imgcls.data.sources import images_under

    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found += images_under(path)[: limit - len(found)]
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
