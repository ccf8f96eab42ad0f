"""Labels for unlabelled files: expand the inputs, then top-k per file.

The model comes from :func:`imgcls.predictor.load_predictor` (an imgcls
checkpoint or run folder, the newest run under ./runs by default; an exported
``.onnx`` / ``.pt`` / ``.ts``; or ``--arch NAME --pretrained``, torchvision's
published ImageNet weights). Files are decoded by
:func:`imgcls.data.inputs.decoded_batches` one batch ahead of the model; a file that
cannot be read becomes a :class:`Failure` record in the stream and the rest go on.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from imgcls import interrupts
from imgcls.calibration import probabilities, scale
from imgcls.data.decode import IMAGE_EXTENSIONS, DecodeError
from imgcls.data.inputs import decoded_batches
from imgcls.data.sources import images_under
from imgcls.errors import UsageError
from imgcls.openset import Rejection, parse_min_confidence, rejection_for
from imgcls.openset_features import HeadInputs, refuse_export, with_statistics
from imgcls.predictor import Predictor, load_predictor, multilabel_labels
from imgcls.text import shown

Log = Callable[[str], None]
UNKNOWN = "unknown"  # the answer for a rejected image (the flag `unknown` tells it from a class so named)
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
    # multi-label models: every label at or above its threshold, highest first (may be empty)
    labels: list[tuple[str, float]] | None = None
    # --min-confidence (imgcls.openset): True when rejected (label "unknown"), None when not asked
    unknown: bool | None = None
    score: float | None = None  # the confidence score it was judged by

    def to_dict(self) -> dict:
        rejection = {} if self.unknown is None else {"unknown": self.unknown, "score": self.score}
        if self.labels is not None:
            return {
                "file": self.file,
                **({"label": UNKNOWN} if self.unknown else {}),
                "labels": [{"label": label, "p": p} for label, p in self.labels],
                "top_k": [{"label": label, "p": p} for label, p in self.top_k],
                **rejection,
            }
        return {
            "file": self.file,
            "label": self.label,
            "confidence": self.confidence,
            "top_k": [{"label": label, "p": p} for label, p in self.top_k],
            "unsure": self.unsure,
            **rejection,
        }


@dataclass
class Failure:
    file: str
    error: str

    def to_dict(self) -> dict:
        return {"file": self.file, "error": self.error}


# --------------------------------------------------------------------------- inputs


def collect_inputs(
    args: Sequence[str], stdin: TextIO | None = None, null: bool = False
) -> tuple[list[Path], list[Failure]]:
    """Expand PATH arguments into image files, in order, without duplicates.

    A file is taken as named (the decoder judges it); a folder gives its
    images recursively; a pattern the shell left alone (quoted) is expanded
    here; ``-`` reads one path per line from ``stdin`` (surrounding blanks
    dropped), or with ``null`` one per NUL-terminated name, taken exactly
    (as ``xargs -0``: a name may hold a newline). Names are read as bytes
    where the stream has them, so a name that is not UTF-8 still opens.
    Names that match nothing come back as failures.
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
            for name in _stdin_names(stdin if stdin is not None else sys.stdin, null):
                take(name, allow_glob=False)
        else:
            take(arg, allow_glob=True)
    return files, missing


def _stdin_names(stream: TextIO, null: bool) -> list[str]:
    """The names on ``stream``: one per line, or NUL-terminated with ``null``; empty ones skipped."""
    raw = getattr(stream, "buffer", None)
    if raw is not None:
        data = raw.read()
        names = [os.fsdecode(n) for n in data.split(b"\0" if null else b"\n")]
    else:
        names = stream.read().split("\0" if null else "\n")
    if not null:
        names = [n.strip() for n in names]
    return [n for n in names if n]


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
    tta: bool = False,
    rejection: Rejection | None = None,
) -> Iterator[Prediction | Failure]:
    """One record per file, in input order, streamed batch by batch.

    Multi-label models: ``labels`` holds every class whose sigmoid probability
    is at or above its threshold (the model's tuned thresholds, 0.5 by
    default; ``threshold`` replaces them all). ``tta``: logits averaged with
    the left-right flipped image (:func:`imgcls.forward.tta_logits`).
    ``rejection``: a file whose confidence score is below its threshold is
    answered ``unknown`` (multi-label: only when no label is on), its
    probabilities still given (:mod:`imgcls.openset`; a feature score reads
    the classifier layer's input while the model runs).
    """
    if (
        rejection is not None
        and rejection.scorer is not None
        and isinstance(predictor.forward, torch.nn.Module)
    ):
        with HeadInputs(predictor.forward) as heads:
            yield from _records(
                predictor, files, batch_size, top_k, threshold, threads, tta, rejection, heads
            )
    else:
        yield from _records(predictor, files, batch_size, top_k, threshold, threads, tta, rejection, None)


def _records(
    predictor: Predictor,
    files: Sequence[Path],
    batch_size: int,
    top_k: int,
    threshold: float | None,
    threads: int | None,
    tta: bool,
    rejection: Rejection | None,
    heads: HeadInputs | None,
) -> Iterator[Prediction | Failure]:
    done = 0
    for results in decoded_batches(files, predictor.preprocessing, batch_size, threads):
        interrupts.check()  # a Ctrl-C that compiled code swallowed: no more records
        names = [str(p) for p in files[done : done + len(results)]]
        done += len(results)
        good = [r for r in results if isinstance(r, torch.Tensor)]
        records: list[Prediction] = []
        if good:
            logits_ = calibrated_logits(predictor, torch.stack(good), tta=tta)
            readable = [n for n, r in zip(names, results, strict=True) if isinstance(r, torch.Tensor)]
            features = heads.take() if heads is not None else None
            records = prediction_records(predictor, logits_, readable, top_k, threshold, rejection, features)
        answers = iter(records)
        for name, result in zip(names, results, strict=True):
            yield Failure(name, result.reason) if isinstance(result, DecodeError) else next(answers)


def calibrated_logits(predictor: Predictor, x_uint8: torch.Tensor, *, tta: bool = False) -> torch.Tensor:
    """A batch's logits divided by the model's temperature: what probabilities and the
    open-set scores are computed from (evaluate picks its thresholds on the same)."""
    return scale(predictor.batch_logits(x_uint8, tta=tta), predictor.temperature)


def prediction_records(
    predictor: Predictor,
    logits_: torch.Tensor,
    names: Sequence[str],
    top_k: int = 3,
    threshold: float | None = None,
    rejection: Rejection | None = None,
    features: torch.Tensor | None = None,
) -> list[Prediction]:
    """One record per row of ``logits_`` (:func:`calibrated_logits`): top-k,
    multi-label labels, ``unknown`` (``features``: the classifier layer's input,
    for a feature score). The one place an answer is built: predict and the
    server both come here."""
    classes, multilabel = predictor.classes, predictor.task == "multilabel"
    k = max(1, min(top_k, len(classes)))
    probs = probabilities(logits_, multilabel)
    top_p, top_i = probs.topk(k, dim=1)
    decided = multilabel_labels(predictor, probs, threshold) if multilabel else []
    unknown, scores = _judged(rejection, logits_, decided, multilabel, features)
    out = []
    for row, name in enumerate(names):
        top = [(classes[i], p) for i, p in zip(top_i[row].tolist(), top_p[row].tolist(), strict=True)]
        rejected, score = unknown[row], scores[row]
        if multilabel:
            labels = decided[row]
            label = ";".join(label for label, _ in labels)
            out.append(
                Prediction(
                    name,
                    UNKNOWN if rejected else label,
                    labels[0][1] if labels else 0.0,
                    top,
                    labels=labels,
                    unknown=rejected,
                    score=score,
                )
            )
        else:
            unsure = threshold is not None and top[0][1] < threshold
            out.append(
                Prediction(
                    name,
                    UNKNOWN if rejected else top[0][0],
                    top[0][1],
                    top,
                    unsure=unsure,
                    unknown=rejected,
                    score=score,
                )
            )
    return out


def _judged(
    rejection: Rejection | None,
    logits: torch.Tensor,
    decided: list,
    multilabel: bool,
    features: torch.Tensor | None = None,
) -> tuple[list[bool | None], list[float | None]]:
    """Per row: unknown or not, and the score it was judged by (Nones when not asked)."""
    if rejection is None:
        return [None] * len(logits), [None] * len(logits)
    labelled = [bool(labels) for labels in decided] if multilabel else None
    unknown, scores = rejection.judge(logits, labelled, multilabel, features)
    return list(unknown), list(scores)


def rejection_of(
    predictor: Predictor, min_confidence: str | None, score: str | None, log: Log
) -> Rejection | None:
    """``--min-confidence`` / ``--score`` for a loaded model (predict and serve):
    None when not asked; a feature score needs a checkpoint and its fitted statistics."""
    refuse_export(predictor.forward, predictor.source, score)  # a feature score: checkpoints only
    rejection = with_statistics(
        rejection_for(predictor.source, min_confidence, score),
        predictor.forward,
        predictor.source,
        multilabel=predictor.task == "multilabel",
    )
    if rejection is not None:
        also = " and with no label on" if predictor.task == "multilabel" else ""
        log(f"unknown: a file whose {rejection.describe()}{also}")
    return rejection


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
    tta: bool = False,
    null: bool = False,
    min_confidence: str | None = None,
    score: str | None = None,
) -> tuple[Predictor, Iterable[Prediction | Failure]]:
    """Resolve inputs and model; return the predictor and the record stream.

    Paths that match nothing come first in the stream as failures. Raises
    :class:`UsageError` when no input file was found at all. ``null``: names
    on stdin are NUL-terminated (see :func:`collect_inputs`).
    ``min_confidence``: a threshold on ``score`` (:mod:`imgcls.openset`;
    ``run``: the one stored beside the checkpoint) below which a file is
    answered ``unknown``.
    """
    parse_min_confidence(min_confidence, score)  # a bad value is one line before any work
    files, missing = collect_inputs(paths, stdin, null)
    if not files:
        detail = "; ".join(f"{shown(m.file)}: {m.error}" for m in missing[:3])
        raise UsageError(f"no input files found{f' ({detail})' if detail else ''}")
    predictor: Predictor = load_predictor(model, arch=arch, pretrained=pretrained, log=log)
    rejection = rejection_of(predictor, min_confidence, score, log)
    if predictor.task == "multilabel":
        cuts = (
            "tuned thresholds"
            if predictor.thresholds and set(predictor.thresholds) != {0.5}
            else "threshold 0.5"
        )
        if threshold is not None:
            cuts = f"threshold {threshold:g} (--threshold) for every class"
        log(f"multi-label model: every label with a probability at or above its {cuts}")
    interrupts.check()  # before the first line of output

    def stream() -> Iterator[Prediction | Failure]:
        yield from missing
        yield from predict_files(
            predictor,
            files,
            batch_size=batch_size,
            top_k=top_k,
            threshold=threshold,
            tta=tta,
            rejection=rejection,
        )

    return predictor, stream()
