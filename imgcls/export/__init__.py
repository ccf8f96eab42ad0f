"""Export a checkpoint to ONNX, TorchScript or safetensors, and run the result.

Three jobs, three modules:

- :mod:`imgcls.export.writers`: the writers and :func:`export_model`;
- :mod:`imgcls.export.parity`: :class:`Tolerance`, :func:`compare`,
  :func:`parity_checks` (does the export agree with PyTorch?);
- :mod:`imgcls.export.runtime`: :class:`ExportedModel`, :func:`load_exported`
  (what predict imports; no model code, no writers).

Names are re-exported here lazily, so ``from imgcls.export import
load_exported`` imports the runtime alone.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "writers": (
        "ExportResult",
        "export_model",
        "default_out",
        "logits_module",
        "example_input",
        "write_onnx",
        "write_torchscript",
        "write_safetensors",
        "check_batch",
        "list_images",
        "data_images",
        "NOISE_IMAGES",
        "DATA_IMAGES",
        "MAX_CHECK_IMAGES",
    ),
    "parity": (
        "Tolerance",
        "TOLERANCE",
        "ParityCheck",
        "compare",
        "parity_checks",
        "reference_logits",
        "exact_logits",
    ),
    "runtime": (
        "ExportedModel",
        "load_exported",
        "require_onnx",
        "format_from_suffix",
        "export_meta",
        "FORMATS",
        "SUFFIXES",
        "META_KEY",
        "TS_META_FILE",
        "INPUT_NAME",
        "OUTPUT_NAME",
        "ONNX_MISSING",
        "EXPORT_FORMAT",
        "EXPORT_VERSION",
    ),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'imgcls.export' has no attribute '{name}'")
    return getattr(importlib.import_module(f"imgcls.export.{module}"), name)
