"""Which unlabelled images to label next: the ones the model is least sure of.

:func:`pick` reads the inputs exactly as ``imgcls predict`` does (the same
walker, :func:`imgcls.predict.collect_inputs`, and the same safe decode,
:func:`imgcls.data.inputs.decoded_batches`), turns the predictor's
probabilities into one uncertainty score per file and returns the ``n``
files most worth labelling, ranked. Strategies (higher score = label first):

- ``least-confidence``: ``1 - p1`` (p1 the top probability).
- ``margin``: ``1 - (p1 - p2)``: the top two classes are close.
- ``entropy``: the entropy of the probabilities over ``log(K)``, 0..1.
- ``diverse``: the ``POOL_FACTOR * n`` (2n) files with the highest margin score,
  then k-center greedy over the model's embeddings (the input of its
  classifier layer, L2-normalised) from the most uncertain one: each next
  pick is the pool file farthest from every pick so far, so near-copies are
  not picked together while anything else is left. Needs a checkpoint or run
  folder: an exported model gives only its logits.
- ``random``: a uniform sample (``seed``); the score is the draw.

Multi-label models (a sigmoid per label, each with its threshold): ``margin``
scores a file by the label closest to its threshold (the distance to the
threshold over the room on that side, so 1 means a label right at its
threshold); ``entropy`` is the mean binary entropy of the labels, over
``log 2``; the label shown is that closest (``margin``) or most uncertain
(``entropy``) label with its probability. ``least-confidence`` is refused (it
is a single-label idea: use ``margin``).

Inference only: nothing here imports training code.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch

from imgcls import interrupts
from imgcls.data.decode import DecodeError
from imgcls.data.inputs import decoded_batches
from imgcls.errors import UsageError
from imgcls.openset_features import HeadInputs
from imgcls.pick_out import check_copy_target, copy_out
from imgcls.predict import Failure, collect_inputs
from imgcls.predictor import Predictor, load_predictor, predict_scores
from imgcls.text import shown

Log = Callable[[str], None]
STRATEGIES = ("margin", "entropy", "least-confidence", "diverse", "random")
POOL_FACTOR = 2  # diverse: k-center greedy over this many times n of the most uncertain files (bench/pick_gain.py: 2 beat 5 and 10)
_EPS = 1e-12


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Pick:
    rank: int
    file: str
    score: float
    label: str  # the predicted label (multi-label: the label the model is least sure of)
    probability: float  # of that label

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Picked:
    """What :func:`pick` found: the ranked picks, the files that failed, and how many were scored."""

    strategy: str
    model: str
    task: str
    scored: int
    picks: list[Pick] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    copied_to: str | None = None

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "strategy": self.strategy,
            "task": self.task,
            "scored": self.scored,
            "picks": [p.to_dict() for p in self.picks],
            "failed": [f.to_dict() for f in self.failures],
            "copied_to": self.copied_to,
        }


# --------------------------------------------------------------------------- scores


def uncertainty(
    probs: torch.Tensor, strategy: str, task: str = "single", thresholds: Sequence[float] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``probs`` (N x K, from :func:`imgcls.predictor.predict_scores`):
    the uncertainty score (higher = label first) and the index of the label to show.

    ``diverse`` ranks its pool by the ``margin`` score; ``random`` has no score here.
    """
    if strategy == "diverse":
        strategy = "margin"
    probs = probs.double()
    if task == "multilabel":
        return _multilabel_uncertainty(probs, strategy, thresholds)
    top = probs.topk(min(2, probs.shape[1]), dim=1)
    shown_label = top.indices[:, 0]
    p1 = top.values[:, 0]
    if strategy == "least-confidence":
        return 1 - p1, shown_label
    if strategy == "margin":
        p2 = top.values[:, 1] if probs.shape[1] > 1 else torch.zeros_like(p1)
        return 1 - (p1 - p2), shown_label
    if strategy == "entropy":
        k = probs.shape[1]
        h = -(probs * probs.clamp_min(_EPS).log()).sum(dim=1)
        return (h / math.log(k) if k > 1 else h), shown_label
    raise UsageError(f"--strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")


def _multilabel_uncertainty(
    probs: torch.Tensor, strategy: str, thresholds: Sequence[float] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if strategy == "margin":
        t = torch.tensor(
            list(thresholds) if thresholds else [0.5] * probs.shape[1], dtype=probs.dtype
        ).expand_as(probs)
        above = probs >= t
        room = torch.where(above, 1 - t, t).clamp_min(_EPS)  # how far that side of the threshold reaches
        distance = ((probs - t).abs() / room).clamp(max=1.0)
        nearest = distance.min(dim=1)
        return 1 - nearest.values, nearest.indices
    if strategy == "entropy":
        p = probs.clamp(_EPS, 1 - _EPS)
        h = -(p * p.log() + (1 - p) * (1 - p).log()) / math.log(2)
        return h.mean(dim=1), h.argmax(dim=1)
    raise UsageError(
        f"--strategy {strategy} is for single-label models; this model is multi-label: use margin "
        "(the label closest to its threshold), entropy, diverse or random"
    )


def k_center_greedy(embeddings: torch.Tensor, n: int) -> list[int]:
    """``n`` row indices of ``embeddings`` (M x D), starting from row 0: each next
    row is the one farthest (Euclidean) from every row chosen so far; ties go to
    the lowest index. Rows in order of preference (most uncertain first) make
    the start the most uncertain file and break ties by uncertainty."""
    m = embeddings.shape[0]
    n = min(n, m)
    if n <= 0:
        return []
    x = embeddings.double()
    chosen = [0]
    nearest = (x - x[0]).square().sum(dim=1)
    nearest[0] = -1.0  # a chosen row is never chosen again
    while len(chosen) < n:
        interrupts.check()
        i = int(nearest.argmax())  # first of the maxima: the most uncertain among equals
        chosen.append(i)
        nearest = torch.minimum(nearest, (x - x[i]).square().sum(dim=1))
        nearest[chosen] = -1.0
    return chosen


# --------------------------------------------------------------------------- embeddings
# the embeddings: the classifier layer's input (openset_features.HeadInputs), L2-normalised

    def close(self) -> None:
        self._handle.remove()


def embeddings_available(predictor: Predictor) -> bool:
    """Embeddings come from a torch model we can hook: a checkpoint or run folder, not an export."""
    return isinstance(predictor.forward, torch.nn.Module)


# --------------------------------------------------------------------------- the run


@dataclass
class _Pool:
    """The ``size`` most uncertain files seen so far, with their embeddings."""

    size: int
    index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    score: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.float64))
    emb: torch.Tensor | None = None

    def add(self, index: torch.Tensor, score: torch.Tensor, emb: torch.Tensor) -> None:
        self.index = torch.cat([self.index, index])
        self.score = torch.cat([self.score, score])
        self.emb = emb if self.emb is None else torch.cat([self.emb, emb])
        order = _ranked(self.score.numpy(), self.index.numpy())[: self.size]
        keep = torch.from_numpy(order)
        self.index, self.score, self.emb = self.index[keep], self.score[keep], self.emb[keep]


def _ranked(score: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Positions by score, highest first; equal scores in input order."""
    return np.lexsort((index, -score))


def check_strategy(strategy: str, n: int) -> None:
    if strategy not in STRATEGIES:
        raise UsageError(f"--strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
    if n < 1:
        raise UsageError(f"--n: {n}: pick at least 1 image")


@torch.inference_mode()
def score_files(
    predictor: Predictor,
    files: Sequence[Path],
    strategy: str,
    n: int,
    *,
    batch_size: int = 64,
    tta: bool = False,
    seed: int = 0,
) -> tuple[list[Pick], list[Failure], int]:
    """Rank ``files`` by ``strategy``; the top ``n`` as picks, the files that failed, how many were scored."""
    heads = None
    if strategy == "diverse":
        if not isinstance(predictor.forward, torch.nn.Module):
            raise UsageError(_refusal(strategy, predictor) or "--strategy diverse needs a torch model")
        heads = HeadInputs(predictor.forward)
    pool = _Pool(min(len(files), POOL_FACTOR * n))
    rng = np.random.default_rng(seed)
    scores, shown_idx, shown_p, good_idx = [], [], [], []
    failures: list[Failure] = []
    done = 0
    try:
        for results in decoded_batches(files, predictor.preprocessing, batch_size):
            interrupts.check()
            start, done = done, done + len(results)
            good = [i for i, r in enumerate(results, start) if isinstance(r, torch.Tensor)]
            failures += [
                Failure(str(files[i]), r.reason)
                for i, r in enumerate(results, start)
                if isinstance(r, DecodeError)
            ]
            if not good:
                continue
            batch = torch.stack([r for r in results if isinstance(r, torch.Tensor)])
            probs = predict_scores(predictor, predictor.batch_logits(batch, tta=tta)).cpu()
            if strategy == "random":
                score, label = torch.from_numpy(rng.random(len(good))), probs.argmax(dim=1)
            else:
                score, label = uncertainty(probs, strategy, predictor.task, predictor.thresholds)
            if heads is not None:
                pool.add(torch.tensor(good), score, torch.nn.functional.normalize(heads.take(), dim=1))
            scores.append(score)
            shown_idx.append(label)
            shown_p.append(probs.gather(1, label.view(-1, 1)).flatten())
            good_idx += good
    finally:
        if heads is not None:
            heads.close()
    if not good_idx:
        return [], failures, 0
    score_all, label_all, p_all = torch.cat(scores), torch.cat(shown_idx), torch.cat(shown_p)
    row_of = {file_index: row for row, file_index in enumerate(good_idx)}
    if heads is not None and pool.emb is not None:
        order = [row_of[int(pool.index[i])] for i in k_center_greedy(pool.emb, n)]
    else:
        order = _ranked(score_all.numpy(), np.asarray(good_idx))[:n].tolist()
    picks = [
        Pick(
            rank=rank,
            file=str(files[good_idx[row]]),
            score=float(score_all[row]),
            label=predictor.classes[int(label_all[row])],
            probability=float(p_all[row]),
        )
        for rank, row in enumerate(order, 1)
    ]
    return picks, failures, len(good_idx)


def _refusal(strategy: str, predictor: Predictor) -> str | None:
    """Why ``strategy`` cannot run on ``predictor`` (one line), or None."""
    if strategy == "diverse" and not embeddings_available(predictor):
        return (
            f"--strategy diverse needs the model's embeddings, which an exported model "
            f"({shown(predictor.source)}) does not give: pick from its run folder or checkpoint, or use margin"
        )
    if strategy == "least-confidence" and predictor.task == "multilabel":
        return (
            "--strategy least-confidence is for single-label models; this model is multi-label: use margin "
            "(the label closest to its threshold), entropy, diverse or random"
        )
    return None


def data_folders(paths: Sequence[str], files: Sequence[Path]) -> set[Path]:
    """Where the inputs live: each folder given, and the folder of each file found."""
    folders = {
        Path(os.path.expanduser(p)) for p in paths if p != "-" and Path(os.path.expanduser(p)).is_dir()
    }
    return folders | {f.parent for f in files}


def pick(
    paths: Sequence[str],
    *,
    n: int,
    strategy: str = "margin",
    model: str | os.PathLike | None = None,
    batch_size: int = 64,
    tta: bool = False,
    seed: int = 0,
    copy_to: Path | None = None,
    stdin: TextIO | None = None,
    log: Log = _stderr,
) -> Picked:
    """The ``n`` files under ``paths`` most worth labelling, by ``strategy``;
    copied into ``copy_to`` when given (:func:`imgcls.pick_out.copy_out`).

    Raises :class:`UsageError` before any image is decoded for a bad strategy
    or ``n``, no input file, a ``copy_to`` inside the data or holding other
    files, ``diverse`` on an exported model, ``least-confidence`` on a
    multi-label one. Files that cannot be read are returned as failures; the
    rest are ranked.
    """
    check_strategy(strategy, n)
    files, missing = collect_inputs(paths, stdin)
    if not files:
        detail = "; ".join(f"{shown(m.file)}: {m.error}" for m in missing[:3])
        raise UsageError(f"no input files found{f' ({detail})' if detail else ''}")
    replace = check_copy_target(copy_to, data_folders(paths, files)) if copy_to is not None else False
    predictor = load_predictor(model, log=log)
    refusal = _refusal(strategy, predictor)
    if refusal:
        raise UsageError(refusal)
    interrupts.check()
    picks, failures, scored = score_files(
        predictor, files, strategy, n, batch_size=batch_size, tta=tta, seed=seed
    )
    picked = Picked(strategy, predictor.source, predictor.task, scored, picks, [*missing, *failures])
    if copy_to is not None and picks:
        if replace:
            log(f"--copy-to {shown(copy_to)}: replacing the copies of an earlier pick there")
        picked.copied_to = str(copy_out(picks, copy_to, replace))
    return picked
