"""The data pipeline: source -> decode -> cache, then batched augmentation.

:func:`prepare_data` is the one door the trainer uses: it lists a recipe's
images (:mod:`sources`), decodes each split once into a uint8 tensor kept in
the persistent decoded cache (:mod:`cache`), checks the share of unreadable
files and measures mean/std (:mod:`loader`)::

    data = prepare_data(recipe.data, base_dir=recipe_dir, log=print)
    data.train.x, data.train.y  # uint8 (N, C, H, W), int64 (N,)

The trainer batches, augments (:func:`build_augment`, :func:`mix_batch`) and
normalises those tensors in its own loop (imgcls.training).

The names below are imported on first use (PEP 562): decode worker processes
import :mod:`imgcls.data.decode`, which loads this package first, and must
not pay for importing torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "build_augment": "augment",
    "mix_batch": "augment",
    "DecodedSplit": "cache",
    "check_bad": "cache",
    "load_split": "cache",
    "DecodeError": "decode",
    "decode_image": "decode",
    "load_image": "decode",
    "compute_mean_std": "loader",
    "PreparedData": "prepare",
    "default_cache_dir": "prepare",
    "prepare_data": "prepare",
    "Progress": "progress",
    "shapes_dir": "shapes",
    "write_shapes": "shapes",
    "Source": "sources",
    "open_source": "sources",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'imgcls.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"imgcls.data.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
