"""Real small data sets for tests and benchmarks, written as image folders.

scikit-learn's digits (1,797 handwritten 8x8 digits, bundled with the
package: nothing is downloaded) are written one PNG per image, one sub-folder
per class, upscaled to ``size`` pixels. Benchmarks import this too
(``sys.path`` gets ``tests/``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def digits_arrays(size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 N x size x size, labels int N) of scikit-learn's digits, in its order."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = (bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    images = np.stack(
        [np.asarray(Image.fromarray(p).resize((size, size), Image.Resampling.BILINEAR)) for p in pixels]
    )
    return images, bunch.target.astype(int)


def write_digits(out: Path, size: int = 16, indices: list[int] | np.ndarray | None = None) -> Path:
    """Write the digits (all, or those at ``indices``) to ``out/d<digit>/<index>.png``.

    Class folders are named ``d0`` … ``d9``, so that their sorted order is the
    digit order. Returns ``out``.
    """
    images, labels = digits_arrays(size)
    chosen = range(len(labels)) if indices is None else [int(i) for i in indices]
    for i in chosen:
        folder = out / f"d{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(folder / f"{i:04d}.png")
    return out
