"""Running an exported classifier: what ``imgcls predict`` imports for a
``.onnx`` / ``.pt`` / ``.ts`` / exported ``.safetensors`` file.

The file carries what a consumer needs to feed it: class names in index
order, input shape, channels, mean/std and resize policy, the calibration
temperature (applied by :func:`imgcls.predictor.predict_scores`, never folded
into the graph, whose output stays the raw logits), as one JSON
document under the key ``imgcls``: in ONNX ``metadata_props``, in
TorchScript the extra file ``imgcls.json``, in safetensors the header
metadata (``imgcls.export``, beside the checkpoint's own ``imgcls`` key).
That document is validated (:mod:`imgcls.metadata`) before anything runs.

This module never imports model code (``imgcls.models``) nor the writers:
an ONNX file runs in onnxruntime alone. Only an exported safetensors file,
which is weights without a graph, rebuilds the model from its recipe.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls.errors import CheckpointError, UsageError
from imgcls.metadata import EXPORT_FORMAT, EXPORT_VERSION, check_head, parse_export_meta

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".ts"), "safetensors": (".safetensors",)}
META_KEY = "imgcls"  # ONNX metadata_props key / safetensors header key
TS_META_FILE = "imgcls.json"  # TorchScript _extra_files name
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_MISSING = "ONNX export needs onnx and onnxruntime: pip install 'imgcls[onnx]'"


def format_from_suffix(path: Path) -> str | None:
    return next((fmt for fmt, sufs in SUFFIXES.items() if path.suffix.lower() in sufs), None)


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
        # multi-label models keep their semantics in the file: sigmoid per class, tuned thresholds;
        # the calibration temperature travels as metadata: the graph's output stays the logits
        **{k: ckpt.meta[k] for k in ("task", "thresholds", "calibration") if ckpt.meta.get(k) is not None},
    }


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
            y = self.runner(x)
        else:
            # a static-batch file: feed whole batches, padding the last with copies
            n = len(x)
            index = [i % n for i in range(-(-n // fixed) * fixed)]
            parts = [self.runner(x[index[i : i + fixed]]) for i in range(0, len(index), fixed)]
            y = torch.cat(parts)[:n]
        if y.ndim != 2 or y.shape[1] != len(self.classes):
            raise CheckpointError(
                f"{self.path}: classes: {len(self.classes)} names, but the model's output has shape "
                f"{list(y.shape)}"
            )
        return y


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


def _load_onnx(path: Path) -> ExportedModel:
    _, ort = require_onnx()
    import numpy as np

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise CheckpointError(f"{path}: onnxruntime cannot load it ({_first_line(exc)})") from None
    meta = parse_export_meta(session.get_modelmeta().custom_metadata_map.get(META_KEY), str(path))
    first, out = session.get_inputs()[0], session.get_outputs()[0]
    dims = list(first.shape)
    if len(dims) != 4 or any(
        isinstance(d, int) and d != m for d, m in zip(dims[1:], meta["input_shape"], strict=True)
    ):
        raise CheckpointError(
            f"{path}: input_shape: {meta['input_shape']} in the metadata, but the graph's input is {dims}"
        )
    if out.shape and isinstance(out.shape[-1], int):
        check_head(meta["classes"], out.shape[-1], str(path), f"the graph's output ({out.name})")
    input_name, output_name = first.name, out.name
    batch = dims[0] if isinstance(dims[0], int) else None

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
            # never pass on PyTorch's advice to load a pickle instead
            raise CheckpointError(
                f"{path}: not a TorchScript file ({_first_line(exc)}); imgcls runs TorchScript written "
                "by `imgcls export --format torchscript` and never unpickles a torch.save file"
            ) from None
    meta = parse_export_meta(files[TS_META_FILE], str(path))
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
    from imgcls.forward import main_logits

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(f"{META_KEY}.export")
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if raw is None:  # a plain checkpoint works too
        ckpt = load_checkpoint(path)
        meta = export_meta(ckpt)
    else:
        meta = parse_export_meta(raw, str(path))
        ckpt = load_checkpoint(path)
        for key in ("classes", "preprocessing", "input_shape", "task", "thresholds", "calibration"):
            if meta.get(key) != ckpt.meta.get(key):
                raise CheckpointError(
                    f"{path}: {key}: the export metadata ({META_KEY}.export) and the checkpoint's "
                    f"({META_KEY}) disagree"
                )
    model = ckpt.model.eval()

    def run(x):
        with torch.no_grad():
            return main_logits(model(x))

    return ExportedModel(path, meta, "safetensors", run)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
