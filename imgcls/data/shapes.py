"""The built-in synthetic dataset: one shape per image, anywhere in the frame.

Each image is one shape (by default circle, ring, square, triangle, star or
cross; crescent and bar on request) in a random colour, size, rotation and position, on a background of a
random colour with a mild gradient plus pixel noise. The object can be anywhere, so a
model has to be translation-tolerant (a CNN is; an MLP on raw pixels much less
so), yet a small CNN learns it in about a minute on a laptop CPU.

Images are drawn deterministically from ``(seed, kind, index)``: the same spec
gives byte-identical PNGs, and adding a class does not change the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imgcls.errors import DataError
from imgcls.recipe import ShapesSpec

KINDS = ("circle", "ring", "square", "triangle", "star", "cross", "crescent", "bar")
# The default classes: crescent and bar look locally like circle/ring and
# square, which a small CNN with global pooling learns much more slowly; ask
# for them explicitly (data.shapes.classes) for a harder set.
DEFAULT_CLASSES = ("circle", "ring", "square", "triangle", "star", "cross")
MANIFEST = "imgcls-shapes.json"  # written last: its presence means "complete"
GENERATOR_VERSION = 1  # bump when drawing changes, so old caches are rebuilt
_SUPERSAMPLE = 4  # draw masks at 4x, then downsample: antialiased edges
# Difficulty knobs, set by measurement (see the data-pipeline report): with
# strong background gradients and noise a small CNN needs several minutes.
RADIUS = (0.18, 0.36)  # shape radius as a fraction of the image side
NOISE = (2, 6)  # range of the pixel noise's std
GRADIENT = 0.3  # strength of the background colour gradient
MIN_CONTRAST = 250  # min sum over RGB of |shape colour - mean background|


def shape_classes(spec: ShapesSpec) -> list[str]:
    classes = list(spec.classes) if spec.classes else list(DEFAULT_CLASSES)
    unknown = [c for c in classes if c not in KINDS]
    if unknown:
        raise DataError(
            f"data.shapes.classes: unknown shape '{unknown[0]}' (choose from: {', '.join(KINDS)})"
        )
    if len(set(classes)) < 2:
        raise DataError("data.shapes.classes: need at least 2 different shapes")
    return sorted(set(classes))


def _mask(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """Antialiased L mask (255 = shape) of one randomly placed ``kind``."""
    s = size * _SUPERSAMPLE
    r = rng.uniform(*RADIUS) * s  # radius of the shape's bounding circle
    cx = rng.uniform(r * 0.8, s - r * 0.8)  # may touch the edge, never leave
    cy = rng.uniform(r * 0.8, s - r * 0.8)
    angle = rng.uniform(0, 2 * np.pi)
    im = Image.new("L", (s, s), 0)
    draw = ImageDraw.Draw(im)

    def poly(points: list[tuple[float, float]]) -> None:
        c, si = np.cos(angle), np.sin(angle)
        pts = [(cx + x * c - y * si, cy + x * si + y * c) for x, y in points]
        draw.polygon(pts, fill=255)

    def regular(n: int, radius: float, phase: float = 0.0) -> list[tuple[float, float]]:
        t = phase + np.arange(n) * 2 * np.pi / n
        return list(zip(radius * np.cos(t), radius * np.sin(t), strict=True))

    if kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif kind == "ring":
        inner = r * rng.uniform(0.5, 0.62)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        draw.ellipse((cx - inner, cy - inner, cx + inner, cy + inner), fill=0)
    elif kind == "square":
        poly(regular(4, r * 0.95, np.pi / 4))
    elif kind == "triangle":
        poly(regular(3, r * 1.05))
    elif kind == "star":
        outer = regular(5, r * 1.1)
        points_in = regular(5, r * 0.45, np.pi / 5)
        poly([p for pair in zip(outer, points_in, strict=True) for p in pair])
    elif kind == "cross":
        a, b = r * 0.9, r * 0.3
        poly([(-a, -b), (-b, -b), (-b, -a), (b, -a), (b, -b), (a, -b),
              (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b)])  # fmt: skip
    elif kind == "crescent":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        off = r * 0.55
        ox, oy = cx + off * np.cos(angle), cy + off * np.sin(angle)
        draw.ellipse((ox - r * 0.85, oy - r * 0.85, ox + r * 0.85, oy + r * 0.85), fill=0)
    elif kind == "bar":
        a, b = r * 1.1, r * 0.28
        poly([(-a, -b), (a, -b), (a, b), (-a, b)])
    else:  # pragma: no cover - shape_classes checked the name
        raise ValueError(kind)
    return im.resize((size, size), Image.Resampling.BOX)


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One (size, size, 3) uint8 image of ``kind``."""
    # Background: a linear gradient between two colours, plus noise.
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    t = (xx * np.cos(theta) + yy * np.sin(theta) + 1.5) / 3  # in [0, 1]
    bg = c0 + GRADIENT * (c1 - c0) * t[..., None]
    # Shape colour: far enough from the mean background that it is visible.
    mean_bg = bg.mean(axis=(0, 1))
    for _ in range(20):
        fg = rng.uniform(0, 255, 3)
        if np.abs(fg - mean_bg).sum() > MIN_CONTRAST:
            break
    else:
        fg = np.where(mean_bg < 128, 255.0, 0.0) * 0.9 + fg * 0.1
    mask = np.asarray(_mask(kind, size, rng), dtype=np.float64)[..., None] / 255
    img = bg * (1 - mask) + fg * mask
    img += rng.normal(0, rng.uniform(*NOISE), img.shape)
    return np.rint(img).clip(0, 255).astype(np.uint8)


def spec_key(spec: ShapesSpec) -> str:
    data = {"version": GENERATOR_VERSION, "classes": shape_classes(spec)}
    data.update(per_class=spec.per_class, image_size=spec.image_size, seed=spec.seed)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def cache_root() -> Path:
    """``$IMGCLS_CACHE``, else ``$XDG_CACHE_HOME/imgcls``, else ``~/.cache/imgcls``."""
    if os.environ.get("IMGCLS_CACHE"):
        return Path(os.environ["IMGCLS_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "imgcls"
    return Path.home() / ".cache" / "imgcls"


def shapes_dir(spec: ShapesSpec) -> Path:
    """Where the shapes set for ``spec`` lives by default (keyed by its hash)."""
    return cache_root() / "shapes" / spec_key(spec)


def is_complete(out_dir: Path, spec: ShapesSpec) -> bool:
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("key") == spec_key(spec)


def write_shapes(out_dir: str | os.PathLike, spec: ShapesSpec) -> Path:
    """Write the set as an ImageFolder (``out_dir/<class>/<class>_0000.png``).

    Returns at once when ``out_dir`` already holds this spec. Images go to a
    temporary sibling folder with the manifest written last, which is then
    renamed into place: a crash never leaves a half-written set at ``out_dir``,
    and concurrent writers (e.g. DDP ranks) are safe. An ``out_dir`` holding
    something other than an imgcls shapes set is never deleted.
    """
    out_dir = Path(out_dir)
    if is_complete(out_dir, spec):
        return out_dir
    classes = shape_classes(spec)
    if out_dir.exists():
        ours = (out_dir / MANIFEST).exists()
        if out_dir.is_dir() and (ours or not any(out_dir.iterdir())):
            shutil.rmtree(out_dir)  # an older/other shapes set: rebuild
        else:
            raise DataError(
                f"{out_dir}: exists and is not an imgcls shapes folder; choose another data.path or remove it"
            )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for kind in classes:
            (tmp / kind).mkdir()
            index = KINDS.index(kind)
            for i in range(spec.per_class):
                rng = np.random.default_rng([spec.seed, index, i])
                img = draw_shape(kind, spec.image_size, rng)
                Image.fromarray(img).save(tmp / kind / f"{kind}_{i:04d}.png")
        manifest = {
            "key": spec_key(spec),
            "generator_version": GENERATOR_VERSION,
            "spec": spec.model_dump(mode="json"),
            "classes": classes,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if not is_complete(out_dir, spec):  # lost a race to a finished writer?
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _remove_stale_temps(out_dir: Path, max_age_s: float = 3600.0) -> None:
    """Remove temp folders left by writers that crashed over an hour ago."""
    now = time.time()
    for old in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        try:
            if now - old.stat().st_mtime > max_age_s:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
