"""Labels for unlabelled files: load any model kind, decode in batches, top-k.

Three kinds of model give one :class:`Predictor` (class names, the
preprocessing dict, a function from a normalised float batch to logits):

- an imgcls checkpoint or run folder (``--model``; default: the newest run
  under ./runs);
- an exported model, ``.onnx`` / ``.pt`` / ``.ts`` (``imgcls.export``);
- a torchvision architecture with its published ImageNet weights
  (``--arch NAME --pretrained``), fetched once into the torch hub cache
  exactly as torchvision does, and preprocessed as its ``weights.transforms()``
  does: shorter side to ``resize_to``, centre crop to ``image_size``.

Files are decoded with the one safe decoder (imgcls.data.decode) on a small
thread pool that runs one batch ahead of the model; a file that cannot be read
becomes a :class:`Failure` record in the stream and the rest go on.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from imgcls.data.cache import decode_threads
from imgcls.data.decode import IMAGE_EXTENSIONS, DecodeError, decode_image, image_to_tensor, load_image
from imgcls.data.loader import normalize
from imgcls.data.sources import images_under
from imgcls.errors import CheckpointError, UsageError

Log = Callable[[str], None]
EXPORTED_SUFFIXES = (".onnx", ".pt", ".ts")
_GLOB_CHARS = re.compile(r"[*?[]")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- records


@dataclass
class Prediction:
    file: str
    label: str
    confidence: float
    top_k: list[tuple[str, float]] = field(default_factory=list)
    unsure: bool = False

    def to_dict(self) -> dict:
        return {
            "file": self.file,
            "label": self.label,
            "confidence": self.confidence,
            "top_k": [{"label": label, "p": p} for label, p in self.top_k],
            "unsure": self.unsure,
        }


@dataclass
class Failure:
    file: str
    error: str

    def to_dict(self) -> dict:
        return {"file": self.file, "error": self.error}


# --------------------------------------------------------------------------- inputs


def collect_inputs(args: Sequence[str], stdin: TextIO | None = None) -> tuple[list[Path], list[Failure]]:
    """Expand PATH arguments into image files, in order, without duplicates.

    A file is taken as named (the decoder judges it); a folder gives its
    images recursively; a pattern the shell left alone (quoted) is expanded
    here; ``-`` reads one path per line from ``stdin``. Names that match
    nothing come back as failures.
    """
    files: list[Path] = []
    missing: list[Failure] = []
    seen: set[str] = set()

    def add(path: Path) -> None:
        key = os.path.normpath(str(path))
        if key not in seen:
            seen.add(key)
            files.append(path)

    def take(arg: str, allow_glob: bool) -> None:
        path = Path(os.path.expanduser(arg))
        if path.is_dir():
            for f in images_under(path):
                add(f)
        elif path.exists():
            add(path)
        elif allow_glob and _GLOB_CHARS.search(arg):
            matches = sorted(glob.glob(os.path.expanduser(arg), recursive=True))
            images = []
            for m in matches:
                p = Path(m)
                if p.is_dir():
                    images.extend(images_under(p))
                elif p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
                    images.append(p)
            if not images:
                missing.append(Failure(arg, "no image file matches this pattern"))
            for f in images:
                add(f)
        else:
            missing.append(Failure(arg, "no such file or folder"))

    for arg in args:
        if arg == "-":
            stream = stdin if stdin is not None else sys.stdin
            for line in stream:
                name = line.strip()
                if name:
                    take(name, allow_glob=False)
        else:
            take(arg, allow_glob=True)
    return files, missing


# --------------------------------------------------------------------------- models


@dataclass
class Predictor:
    classes: list[str]
    preprocessing: dict
    forward: Callable[[torch.Tensor], torch.Tensor]  # normalised float NCHW -> logits
    source: str  # what was loaded, for the log


def load_predictor(
    model: str | os.PathLike | None = None,
    *,
    arch: str | None = None,
    pretrained: bool = False,
    runs_root: Path = Path("runs"),
    log: Log = _stderr,
) -> Predictor:
    """The model to predict with: a checkpoint, an exported file or a torchvision arch."""
    if arch is not None:
        if model is not None:
            raise UsageError("give --model or --arch, not both")
        if not pretrained:
            raise UsageError(
                f"--arch {arch} without --pretrained would predict with random weights; "
                "add --pretrained (ImageNet classes) or pass your own --model"
            )
        return load_pretrained(arch, log)
    if pretrained:
        raise UsageError("--pretrained needs --arch NAME (e.g. --arch resnet18)")
    if model is None:
        from imgcls.checkpoint import latest_run

        path = latest_run(runs_root)
        log(f"model: {path} (the most recent run; choose another with --model)")
        model = path
    path = Path(model).expanduser()
    if path.suffix.lower() in EXPORTED_SUFFIXES:
        return _load_exported(path)
    from imgcls.checkpoint import load_checkpoint
    from imgcls.models.build import main_logits  # not for exported models: no model code

    ckpt = load_checkpoint(path)
    net = ckpt.model

    def forward(x: torch.Tensor) -> torch.Tensor:
        return main_logits(net(x))

    return Predictor(list(ckpt.classes), dict(ckpt.preprocessing), forward, str(ckpt.path))


def _load_exported(path: Path) -> Predictor:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such exported model")
    try:
        from imgcls.export import load_exported
    except ImportError:
        raise CheckpointError(
            f"{path}: exported models need imgcls.export, which this install lacks"
        ) from None
    exported = load_exported(path)
    return Predictor(list(exported.classes), dict(exported.preprocessing), exported, str(path))


# torchvision's builders change these when they load weights; we build bare
# (so the hub file is read with our flags) and set them the same way.
_PRETRAINED_KWARGS = {
    "googlenet": {"transform_input": True, "aux_logits": True, "init_weights": False},
    "inception_v3": {"transform_input": True, "aux_logits": True, "init_weights": False},
}
_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def pretrained_preprocessing(weights) -> dict:
    """Our preprocessing dict for torchvision ``weights.transforms()``."""
    t = weights.transforms()
    crop = list(t.crop_size)
    crop = crop * 2 if len(crop) == 1 else crop
    resize = list(t.resize_size)
    return {
        "image_size": crop,
        "channels": 3,
        "mean": [float(v) for v in t.mean],
        "std": [float(v) for v in t.std],
        "resize": "center_crop",
        "resize_to": int(resize[0]),  # the shorter side, before the crop
        "interpolation": t.interpolation.value,
    }


def load_pretrained(arch: str, log: Log = _stderr) -> Predictor:
    """torchvision ``arch`` with its DEFAULT weights, from the torch hub cache."""
    import torchvision
    from torch.hub import get_dir

    from imgcls.models.build import main_logits

    try:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
    except (ValueError, KeyError):
        raise UsageError(
            f"'{arch}' is not a torchvision architecture with published weights (see `imgcls models`)"
        ) from None
    categories = list(weights.meta["categories"])
    net = torchvision.models.get_model(
        arch, weights=None, num_classes=len(categories), **_PRETRAINED_KWARGS.get(arch, {})
    )
    cached = Path(get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not cached.exists():
        log(f"downloading {weights.url} to {cached} (once)")
    try:
        # torch.hub announces downloads on stdout; keep stdout for results.
        # check_hash applies to a download only; the cached file is read as is.
        with contextlib.redirect_stdout(sys.stderr):
            state = weights.get_state_dict(progress=sys.stderr.isatty(), check_hash=True, weights_only=True)
    except Exception as exc:  # URLError, hash mismatch, unreadable file
        raise CheckpointError(
            f"cannot get the {arch} weights ({type(exc).__name__}: {exc}); without network, put the file at {cached}"
        ) from None
    if arch.startswith("densenet"):
        state = {_DENSENET_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(f"{cached}: weights do not fit {arch}: {str(exc).splitlines()[0]}") from None
    net.eval()
    log(f"model: {arch} with {weights} ({len(categories)} ImageNet classes)")

    def forward(x: torch.Tensor) -> torch.Tensor:
        return main_logits(net(x))

    return Predictor(categories, pretrained_preprocessing(weights), forward, f"{arch} ({weights})")


# --------------------------------------------------------------------------- decode


def load_input(path: str | os.PathLike, preprocessing: dict) -> torch.Tensor:
    """One file as uint8 (C, H, W), decoded and resized as ``preprocessing`` says."""
    channels = int(preprocessing["channels"])
    size = tuple(preprocessing["image_size"])
    if preprocessing.get("resize_to"):
        im = decode_image(path, channels)
        im = _resize_shorter(
            im, int(preprocessing["resize_to"]), preprocessing.get("interpolation", "bilinear")
        )
        return image_to_tensor(_center_crop(im, size))
    return load_image(path, channels, size, preprocessing["resize"])  # type: ignore[arg-type]


def _resize_shorter(im, size: int, interpolation: str):
    """torchvision ``F.resize(img, [size])`` on a PIL image: shorter side to ``size``."""
    from PIL import Image

    resample = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }.get(interpolation, Image.Resampling.BILINEAR)
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return im
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return im.resize((new_w, new_h), resample)


def _center_crop(im, size: tuple[int, int]):
    """torchvision ``F.center_crop`` on a PIL image (pads with black when too small)."""
    from PIL import Image

    crop_h, crop_w = size
    w, h = im.size
    if crop_w > w or crop_h > h:
        canvas = Image.new(im.mode, (max(w, crop_w), max(h, crop_h)), 0)
        canvas.paste(im, ((max(w, crop_w) - w) // 2, (max(h, crop_h) - h) // 2))
        im, (w, h) = canvas, canvas.size
    top = int(round((h - crop_h) / 2.0))
    left = int(round((w - crop_w) / 2.0))
    return im.crop((left, top, left + crop_w, top + crop_h))


def decoded_batches(
    paths: Sequence[Path], preprocessing: dict, batch_size: int, threads: int | None = None
) -> Iterator[list[torch.Tensor | DecodeError]]:
    """Per batch, each file's uint8 tensor or its DecodeError, in input order.

    Decoding runs on a thread pool one batch ahead of the consumer (PIL and
    torch release the GIL), so the model and the decoder overlap.
    """

    def one(path: Path) -> torch.Tensor | DecodeError:
        try:
            return load_input(path, preprocessing)
        except DecodeError as exc:
            return exc

    with ThreadPoolExecutor(threads or decode_threads()) as pool:
        pending: deque[list[Future]] = deque()
        starts = iter(range(0, len(paths), batch_size))

        def submit_next() -> None:
            start = next(starts, None)
            if start is not None:
                pending.append([pool.submit(one, p) for p in paths[start : start + batch_size]])

        submit_next()
        submit_next()
        while pending:
            batch = pending.popleft()
            submit_next()
            yield [f.result() for f in batch]


# --------------------------------------------------------------------------- predict


@torch.inference_mode()
def predict_files(
    predictor: Predictor,
    files: Sequence[Path],
    *,
    batch_size: int = 64,
    top_k: int = 3,
    threshold: float | None = None,
    threads: int | None = None,
) -> Iterator[Prediction | Failure]:
    """One record per file, in input order, streamed batch by batch."""
    classes = predictor.classes
    k = max(1, min(top_k, len(classes)))
    done = 0
    for results in decoded_batches(files, predictor.preprocessing, batch_size, threads):
        names = [str(p) for p in files[done : done + len(results)]]
        done += len(results)
        good = [r for r in results if isinstance(r, torch.Tensor)]
        probs = top_p = top_i = None
        if good:
            pre = predictor.preprocessing
            x = normalize(torch.stack(good), pre["mean"], pre["std"])
            probs = torch.softmax(predictor.forward(x).float(), dim=1)
            top_p, top_i = probs.topk(k, dim=1)
        row = 0
        for name, result in zip(names, results, strict=True):
            if isinstance(result, DecodeError):
                yield Failure(name, result.reason)
                continue
            ps, idx = top_p[row].tolist(), top_i[row].tolist()
            row += 1
            yield Prediction(
                file=name,
                label=classes[idx[0]],
                confidence=ps[0],
                top_k=[(classes[i], p) for i, p in zip(idx, ps, strict=True)],
                unsure=threshold is not None and ps[0] < threshold,
            )


def predict(
    paths: Sequence[str],
    *,
    model: str | os.PathLike | None = None,
    arch: str | None = None,
    pretrained: bool = False,
    batch_size: int = 64,
    top_k: int = 3,
    threshold: float | None = None,
    stdin: TextIO | None = None,
    log: Log = _stderr,
) -> tuple[Predictor, Iterable[Prediction | Failure]]:
    """Resolve inputs and model; return the predictor and the record stream.

    Paths that match nothing come first in the stream as failures. Raises
    :class:`UsageError` when no input file was found at all.
    """
    files, missing = collect_inputs(paths, stdin)
    if not files:
        detail = "; ".join(f"{m.file}: {m.error}" for m in missing[:3])
        raise UsageError(f"no input files found{f' ({detail})' if detail else ''}")
    predictor = load_predictor(model, arch=arch, pretrained=pretrained, log=log)

    def stream() -> Iterator[Prediction | Failure]:
        yield from missing
        yield from predict_files(predictor, files, batch_size=batch_size, top_k=top_k, threshold=threshold)

    return predictor, stream()
