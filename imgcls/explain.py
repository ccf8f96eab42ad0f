"""Why a model answers what it answers: class-activation maps, filters, feature maps.

Three class-activation methods, all on the activations ``A`` (K, h, w) of one
layer and the gradients ``g = d score / d A`` of the class score (its logit):

- ``gradcam``: weights ``w_k = mean(g_k)``; map ``relu(sum_k w_k A_k)``
  (Selvaraju et al. 2017);
- ``gradcam++``: per-pixel weights ``alpha = g^2 / (2 g^2 + sum(A) g^3)``,
  ``w_k = sum(alpha_k relu(g_k))`` (Chattopadhay et al. 2018), sharper when a
  class appears several times;
- ``layercam``: map ``relu(sum_k relu(g_k) A_k)`` (Jiang et al. 2021), which
  keeps the spatial detail of early layers.

Written here with two hooks rather than taken from a library: captum has
Grad-CAM only (no Grad-CAM++ or LayerCAM) and pytorch-grad-cam pulls in
OpenCV; the three methods are a few lines each on the same two tensors.

Images go through the one decode path (:func:`imgcls.data.decode.load_image`)
and the one model-input path (:func:`imgcls.forward.model_input`); the map is
computed on the image as the model sees it (resized to its input size) and
upsampled to it. The target layer defaults to the last module that outputs a
spatial feature map (the last convolutional block); ``--layer`` takes the names
``imgcls summarize`` prints (``conv4``, ``residual1.body.conv2``, ``layer4``).
Models whose last layers work on tokens (vision transformers) are refused:
a map of their patch embedding would not show what the classifier used.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgcls import interrupts
from imgcls.checkpoint import Checkpoint, check_out_dir
from imgcls.data.decode import DecodeError, load_image
from imgcls.errors import PartialFailure, UsageError
from imgcls.forward import logits, main_logits, model_input
from imgcls.io import atomic_path
from imgcls.predictor import checkpoint_predictor, multilabel_labels, predict_scores

METHODS = ("gradcam", "gradcam++", "layercam")
Log = Callable[[str], None]


# --------------------------------------------------------------------------- layers


def layer_outputs(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, tuple[int, ...]]]:
    """(name, output shape) of every named module, in the order their forward finishes."""
    seen: list[tuple[str, tuple[int, ...]]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(mod, args, out, name=name):
            if isinstance(out, torch.Tensor):
                seen.append((name, tuple(out.shape)))

        handles.append(module.register_forward_hook(hook))
    device = next(model.parameters(), torch.zeros(0)).device  # "meta" works: shapes only
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return seen


def default_layer(model: nn.Module, input_shape: Sequence[int], arch: str = "this model") -> str:
    """The last module whose output is a spatial feature map (N, C, H, W), H*W > 1.

    Forward hooks fire inner modules first, so the last such module is the
    outermost block that ends the convolutional part (``layer4`` in a ResNet,
    ``conv4`` in a recipe stack), not a ReLU inside it.
    """
    outputs = layer_outputs(model, input_shape)
    last = None
    for i, (_name, shape) in enumerate(outputs):
        if len(shape) == 4 and shape[2] * shape[3] > 1:
            last = i
    if last is None:
        raise UsageError(
            f"explain: not supported for this architecture ({arch}): no layer outputs a spatial feature map"
        )
    if any(len(shape) == 3 for _, shape in outputs[last + 1 :]):
        raise UsageError(
            f"explain: not supported for this architecture ({arch}): its last layers work on tokens "
            "(a transformer), not on feature maps; class-activation maps need a convolutional network"
        )
    return outputs[last][0]


def find_layer(model: nn.Module, name: str) -> nn.Module:
    modules = dict(model.named_modules())
    if name in modules and name:
        return modules[name]
    import difflib

    names = [n for n in modules if n]
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else " (see `imgcls summarize RUN` for names)"
    raise UsageError(f"--layer {name}: no such layer{hint}")


# --------------------------------------------------------------------------- maps


def _combine(method: str, acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """(N, K, h, w) activations and gradients -> (N, h, w) non-negative map."""
    if method == "gradcam":
        weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = (weights * acts).sum(1)
    elif method == "gradcam++":
        g2, g3 = grads.pow(2), grads.pow(3)
        denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
        alpha = g2 / torch.where(denom != 0, denom, torch.ones_like(denom))
        weights = (alpha * grads.clamp(min=0)).sum(dim=(2, 3), keepdim=True)
        cam = (weights * acts).sum(1)
    elif method == "layercam":
        cam = (grads.clamp(min=0) * acts).sum(1)
    else:
        raise UsageError(f"--method {method}: choose from {', '.join(METHODS)}")
    return cam.clamp(min=0)


def class_maps(
    model: nn.Module, x: torch.Tensor, layer: str, targets: torch.Tensor, method: str = "gradcam"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps for class ``targets[i]`` of image ``x[i]``.

    ``x`` is a batch from :func:`imgcls.forward.model_input`. Returns the maps
    (N, H, W) upsampled to the input size and scaled to 0..1 (all zero when
    nothing in the layer speaks for the class), and the class scores (logits,
    N x K; :func:`imgcls.predictor.predict_scores` makes them probabilities).
    """
    module = find_layer(model, layer)
    captured: dict[str, torch.Tensor] = {}

    def hook(mod, args, out):
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise UsageError(
                f"--layer {layer}: outputs {shape}, not a feature map (N, C, H, W); "
                "class-activation maps need a convolutional layer"
            )
        captured["out"] = out
        # downstream gets a copy: an in-place ReLU after this layer must not
        # change the activations we differentiate against
        return out.clone()

    handle = module.register_forward_hook(hook)
    try:
        with torch.enable_grad():
            # the input asks for gradients, so the layer's output has them even
            # when the weights are frozen
            scores = main_logits(model(x.detach().requires_grad_(True))).float()
            acts = captured["out"]
            chosen = scores.gather(1, targets.view(-1, 1)).sum()
            (grads,) = torch.autograd.grad(chosen, acts)
    finally:
        handle.remove()
    cam = _combine(method, acts.detach().float(), grads.float())
    cam = nn.functional.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[
        :, 0
    ]
    top = cam.flatten(1).max(1).values.view(-1, 1, 1)
    cam = torch.where(top > 0, cam / top.clamp(min=1e-12), torch.zeros_like(cam))
    return cam, scores.detach()


def map_stats(cam: torch.Tensor) -> dict:
    """Peak location (pixels and fractions of the frame, in the model's input)
    and the share of the frame at or above half the peak."""
    h, w = cam.shape
    top = float(cam.max())
    # upsampling a coarse map leaves a plateau at the maximum (reaching the
    # frame's edge when a corner cell is hottest); its pixel nearest to the
    # plateau's centre is the peak, not the plateau's first pixel
    ys, xs = torch.nonzero(cam >= top * 0.99, as_tuple=True)
    cy, cx = ys.float().mean(), xs.float().mean()
    nearest = int(((ys - cy) ** 2 + (xs - cx) ** 2).argmin())
    y, x = int(ys[nearest]), int(xs[nearest])
    area = float((cam >= 0.5 * top).float().mean()) if top > 0 else 0.0
    return {
        "peak": {"x": x, "y": y, "fx": round((x + 0.5) / w, 4), "fy": round((y + 0.5) / h, 4)},
        "area_above_half_max": round(area, 4),
    }


# --------------------------------------------------------------------------- pictures


def _viewable(pixels: torch.Tensor, min_side: int = 256) -> np.ndarray:
    """(C, H, W) uint8 -> (H', W', 3) uint8, scaled up (nearest) so small inputs are visible."""
    a = pixels.numpy().transpose(1, 2, 0)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    scale = max(1, math.ceil(min_side / max(a.shape[:2])))
    return a.repeat(scale, 0).repeat(scale, 1)


def overlay(pixels: torch.Tensor, cam: torch.Tensor, alpha: float = 0.45) -> np.ndarray:
    """The image with the heatmap (jet colours) blended over it, as (H', W', 3) uint8."""
    from matplotlib import colormaps

    base = _viewable(pixels).astype(np.float32)
    scale = base.shape[0] // pixels.shape[1]
    heat = nn.functional.interpolate(
        cam[None, None], scale_factor=scale, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    colour = colormaps["jet"](heat)[..., :3] * 255
    return np.rint(base * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


def side_by_side(pixels: torch.Tensor, cam: torch.Tensor) -> np.ndarray:
    """The image as the model sees it, and beside it the same with the heatmap."""
    left = _viewable(pixels)
    gap = np.full((left.shape[0], 8, 3), 255, dtype=np.uint8)
    return np.concatenate([left, gap, overlay(pixels, cam)], axis=1)


def save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, format="PNG")


def _grid_png(path: Path, tiles: np.ndarray, title: str) -> None:
    """(N, h, w) or (N, h, w, 3) tiles in a near-square grid, via matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tiles)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1 + 0.4, rows * 1.1 + 0.6), squeeze=False)
    try:
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i < n:
                ax.imshow(tiles[i], cmap="gray" if tiles[i].ndim == 2 else None, interpolation="nearest")
                ax.set_title(str(i), fontsize=6)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=90)
    finally:
        plt.close(fig)


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise UsageError("--filters: the model has no convolution layer")


def save_filters(path: Path, model: nn.Module) -> str:
    """The first convolution's filters as an image grid (each scaled to 0..1);
    RGB filters in colour, others as their channel mean in grey. Returns the layer name."""
    name, conv = first_conv(model)
    w = conv.weight.detach().float()
    if w.shape[1] == 3:
        tiles = w.permute(0, 2, 3, 1)
        lo = tiles.flatten(1).min(1).values.view(-1, 1, 1, 1)
        hi = tiles.flatten(1).max(1).values.view(-1, 1, 1, 1)
    else:
        tiles = w.mean(1)
        lo = tiles.flatten(1).min(1).values.view(-1, 1, 1)
        hi = tiles.flatten(1).max(1).values.view(-1, 1, 1)
    tiles = (tiles - lo) / (hi - lo).clamp(min=1e-12)
    _grid_png(path, tiles.numpy(), f"{name}: {w.shape[0]} filters {w.shape[2]}x{w.shape[3]}")
    return name


def feature_maps(model: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """The (C, H, W) output of ``layer`` for the one image in ``x``."""
    module = find_layer(model, layer)
    captured = {}

    def hook(mod, args, out):
        captured["out"] = out.detach().clone() if isinstance(out, torch.Tensor) else out

    handle = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    out = captured["out"]
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UsageError(f"--maps {layer}: outputs {shape}, not feature maps (N, C, H, W)")
    return out[0].float()


def save_feature_maps(path: Path, maps: torch.Tensor, title: str, limit: int = 64) -> None:
    m = maps[:limit]
    lo = m.flatten(1).min(1).values.view(-1, 1, 1)
    hi = m.flatten(1).max(1).values.view(-1, 1, 1)
    _grid_png(path, ((m - lo) / (hi - lo).clamp(min=1e-12)).numpy(), title)


# --------------------------------------------------------------------------- the command


@dataclass
class Explanation:
    file: str
    predicted: str  # multi-label: every label on at its threshold, joined by ';' (as predict writes them)
    probability: float  # of the predicted class (multi-label: the likeliest label on, 0 when none)
    targets: list[dict] = field(default_factory=list)  # class, probability, peak, area, overlay
    maps: str | None = None
    labels: list[tuple[str, float]] | None = None  # multi-label: (label, probability), as predict's

    def to_dict(self) -> dict:
        out = {
            "file": self.file,
            "predicted": self.predicted,
            "probability": round(self.probability, 6),
            "targets": self.targets,
        }
        if self.labels is not None:
            out["labels"] = [{"label": label, "p": p} for label, p in self.labels]
        if self.maps:
            out["maps"] = self.maps
        return out


@dataclass
class ExplainResult:
    checkpoint: str
    method: str
    layer: str
    out_dir: Path
    images: list[Explanation] = field(default_factory=list)
    bad: list[tuple[str, str]] = field(default_factory=list)
    filters: str | None = None

    def to_dict(self) -> dict:
        return {
            "checkpoint": self.checkpoint,
            "method": self.method,
            "layer": self.layer,
            "out_dir": str(self.out_dir),
            "filters": self.filters,
            "images": [e.to_dict() for e in self.images],
            "skipped": [{"file": f, "error": r} for f, r in self.bad],
        }

    def raise_if_skipped(self) -> None:
        if self.bad:
            total = len(self.bad) + len(self.images)
            raise PartialFailure(f"{len(self.bad)} of {total} images could not be read and were skipped")


def resolve_targets(names: Sequence[str], classes: list[str]) -> list[int]:
    """Class names (or indices) -> indices; an unknown one is a usage error listing the classes."""
    out = []
    for name in names:
        if name in classes:
            out.append(classes.index(name))
        elif name.isdigit() and int(name) < len(classes):
            out.append(int(name))
        else:
            raise UsageError(f"--target {name}: not one of the model's classes ({', '.join(classes)})")
    return out


def default_out_dir(ckpt: Checkpoint) -> Path:
    if ckpt.run_dir is not None:
        return ckpt.run_dir / "explain"
    return ckpt.path.parent / f"{ckpt.path.stem}-explain"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def explain(
    images: Sequence[str | os.PathLike],
    ckpt: Checkpoint,
    *,
    method: str = "gradcam",
    layer: str | None = None,
    targets: Sequence[str] = (),
    out: Path | None = None,
    filters: bool = False,
    maps: str | None = None,
    log: Log = lambda message: None,
) -> ExplainResult:
    """Heatmap overlays (one PNG per image and class) for a loaded checkpoint.

    Without ``targets``, each image is explained for its predicted class (a
    multi-label model: for each label it predicts, or its likeliest class when
    none); probabilities and predictions are predict's
    (:func:`imgcls.predictor.predict_scores`, :func:`imgcls.predictor.multilabel_labels`).
    Unreadable images are skipped and listed; the caller makes that exit 3
    (:meth:`ExplainResult.raise_if_skipped`), or 2 when none was readable.
    """
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose from {', '.join(METHODS)}")
    model, classes, pre = ckpt.model, ckpt.classes, ckpt.preprocessing
    predictor = checkpoint_predictor(ckpt)  # softmax or a sigmoid per class, as predict decides
    input_shape = tuple(ckpt.meta["input_shape"])
    arch = ckpt.meta["recipe"].get("model", {}).get("arch") or "recipe model"
    if layer is None:
        layer = default_layer(model, input_shape, arch)
    else:
        find_layer(model, layer)
    if maps is not None:
        find_layer(model, maps)
    wanted = resolve_targets(targets, classes)
    out_dir = Path(out) if out is not None else default_out_dir(ckpt)
    check_out_dir(out_dir, empty=False)  # before the work: a missing or read-only parent, a file
    result = ExplainResult(str(ckpt.path), method, layer, out_dir)
    if filters:
        result.filters = str(out_dir / "filters.png")
        save_filters(out_dir / "filters.png", model)

    used: set[str] = set()
    size = tuple(pre["image_size"])
    for file in images:
        interrupts.check()  # a Ctrl-C that compiled code swallowed: no more pictures
        try:
            pixels = load_image(file, pre["channels"], size, pre["resize"])
        except DecodeError as exc:
            result.bad.append((str(file), exc.reason))
            log(f"warning: skipped {file}: {exc.reason}")
            continue
        stem = _unique_stem(_safe(Path(file).stem), used)
        x = model_input(pixels[None], pre["mean"], pre["std"])
        with torch.no_grad():
            probs = predict_scores(predictor, logits(model, x))[0]
        explanation, predicted = _prediction(predictor, str(file), probs)
        for target in wanted or predicted:
            cam, _ = class_maps(model, x, layer, torch.tensor([target]), method)
            png = out_dir / f"{stem}.{_safe(method)}.{_safe(classes[target])}.png"
            save_png(png, side_by_side(pixels, cam[0]))
            explanation.targets.append(
                {
                    "class": classes[target],
                    "probability": round(float(probs[target]), 6),
                    **map_stats(cam[0]),
                    "overlay": str(png),
                }
            )
        if maps is not None:
            png = out_dir / f"{stem}.maps.{_safe(maps)}.png"
            fm = feature_maps(model, x, maps)
            save_feature_maps(
                png, fm, f"{Path(file).name}: {maps} ({fm.shape[0]} maps {fm.shape[1]}x{fm.shape[2]})"
            )
            explanation.maps = str(png)
        result.images.append(explanation)
    if images and not result.images:
        from imgcls.errors import DataError

        raise DataError(
            f"none of the {len(images)} images could be read ({result.bad[0][0]}: {result.bad[0][1]})"
        )
    return result


def _unique_stem(stem: str, used: set[str]) -> str:
    """``stem``, or ``stem-2``, ``stem-3``...: two inputs with one name (a/x.png, b/x.png)."""
    base, n = stem, 1
    while stem in used:
        n += 1
        stem = f"{base}-{n}"
    used.add(stem)
    return stem


def _prediction(predictor, file: str, probs: torch.Tensor) -> tuple[Explanation, list[int]]:
    """What the model predicts for one image, as predict says it, and the
    classes to explain by default (a multi-label model: each label it predicts,
    or its likeliest class when none)."""
    classes = predictor.classes
    predicted = [int(probs.argmax())]
    if predictor.task == "multilabel":
        (on,) = multilabel_labels(predictor, probs[None])
        explanation = Explanation(file, ";".join(c for c, _ in on), on[0][1] if on else 0.0, labels=on)
        return explanation, [classes.index(c) for c, _ in on] or predicted
    return Explanation(file, classes[predicted[0]], float(probs[predicted[0]])), predicted


# --------------------------------------------------------------------------- evaluate's error gallery


def fit_text(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken into lines no wider than ``width_in`` inches at
    ``fontsize`` points (matplotlib clips a title wider than its figure);
    words longer than a line (paths, long class names) are broken too. A
    character is taken as 0.65 em, a little over DejaVu Sans's average."""
    import textwrap

    chars = max(6, int(width_in * 72 / (fontsize * 0.65)))
    return "\n".join(
        "\n".join(textwrap.wrap(line, chars, break_on_hyphens=False) or [""]) for line in text.split("\n")
    )


def write_error_gallery(
    path: Path,
    ckpt: Checkpoint,
    wrong: Sequence[dict],
    pairs: Sequence[dict],
    *,
    with_heatmaps: bool = False,
    max_pairs: int = 4,
    per_pair: int = 8,
) -> Path | None:
    """A grid of misclassified images, one row per most-confused pair (true ->
    predicted), captioned with both labels and the predicted probability;
    ``with_heatmaps`` overlays the Grad-CAM of the predicted class. ``wrong``:
    evaluate's misclassified records (file, true, predicted, confidence).
    Returns None (and writes nothing) when nothing was misclassified."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for pair in list(pairs)[:max_pairs]:
        found = [w for w in wrong if w["true"] == pair["true"] and w["predicted"] == pair["predicted"]]
        found.sort(key=lambda w: -w["confidence"])  # the surest mistakes first
        if found:
            rows.append((pair, found[:per_pair]))
    if not rows:
        return None
    pre = ckpt.preprocessing
    layer = default_layer(ckpt.model, tuple(ckpt.meta["input_shape"])) if with_heatmaps else None
    cols = max(len(found) for _, found in rows)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(cols * 1.6 + 0.3, len(rows) * 1.9 + 0.3), squeeze=False
    )
    try:
        for r, (_pair, found) in enumerate(rows):
            for c, ax in enumerate(axes[r]):
                ax.axis("off")
                if c >= len(found):
                    continue
                w = found[c]
                try:
                    pixels = load_image(w["file"], pre["channels"], tuple(pre["image_size"]), pre["resize"])
                except DecodeError:
                    continue
                if layer is not None:
                    x = model_input(pixels[None], pre["mean"], pre["std"])
                    target = torch.tensor([ckpt.classes.index(w["predicted"])])
                    cam, _ = class_maps(ckpt.model, x, layer, target)
                    picture = overlay(pixels, cam[0])
                else:
                    picture = _viewable(pixels, min_side=64)
                ax.imshow(picture, interpolation="nearest")
                caption = f"{w['true']} → {w['predicted']}\np={w['confidence']:.2f}"
                ax.set_title(fit_text(caption, 1.5, 7), fontsize=7)
        title = "misclassified, most confused pairs first (true → predicted)"
        fig.suptitle(fit_text(title, cols * 1.6, 9), fontsize=9)
        fig.tight_layout()
        with atomic_path(path) as tmp:  # tight: whatever the wrapping missed is not cut off
            fig.savefig(tmp, format="png", dpi=80, bbox_inches="tight", pad_inches=0.05)
    finally:
        plt.close(fig)
    return path
