""" "unknown": rejecting inputs the model has not seen (open-set / selective prediction).

A *confidence score* per image, computed from the logits (higher means more
like the training data):

- ``msp``: the maximum softmax probability (multi-label: the top sigmoid);
- ``max-logit``: the largest logit;
- ``energy``: the negative free energy ``T·logsumexp(logits / T)`` with
  ``T = 1`` (Liu et al., 2020); multi-label: the joint energy, the sum of
  ``softplus(logit)`` over classes (Wang et al., 2021).

and one from the model's features, for checkpoints (:mod:`imgcls.openset_features`):

- ``mahalanobis``: minus the smallest Mahalanobis distance of the
  classifier layer's input to a class mean (Lee et al., 2018), with
  statistics fitted beside the checkpoint; a :class:`Rejection` for it
  carries them (``scorer``) and judges the features of a batch.

An image is ``unknown`` when its score is below a threshold
(:class:`Rejection`). Multi-label models: an image is unknown when none of
its labels passes its threshold *and* its score is below the threshold (an
image with a label is never unknown).

The threshold that keeps a target share of in-distribution images
(:func:`threshold_for_coverage`) is picked on the run's validation split by
``imgcls evaluate --suggest-threshold`` and stored beside the checkpoint
(``best.openset.json``), keyed to the checkpoint's bytes: ``--min-confidence
run`` uses it (:func:`stored_rejection`). The evaluation side
(:func:`selective_report`): coverage and accuracy of the accepted images, the
risk-coverage curve and its area (AURC), AUROC between two score sets.

Serving a batch: ``Rejection.unknown(logits, labelled)`` gives the mask (a
feature score also needs ``features=``, the batch's classifier-layer inputs,
which :class:`imgcls.openset_features.HeadInputs` records while the model runs).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import torch

from imgcls.errors import CheckpointError, UsageError

SCORES = ("msp", "max-logit", "energy")  # from the logits
FEATURE_SCORES = ("mahalanobis",)  # from the classifier layer's input (imgcls.openset_features)
ALL_SCORES = SCORES + FEATURE_SCORES
# chosen by measurement (README, "Unknown inputs"): on the quickstart against scikit-learn's
# digits, AUROC msp 0.971, max-logit 0.965, energy 0.956 (90.0 / 87.5 / 80.5% rejected at the
# threshold keeping 95% of validation); none of them rejects pixel noise (AUROC <= 0.006)
DEFAULT_SCORE = "msp"
# `evaluate --suggest-threshold` fits mahalanobis when no --score is given: on the quickstart, AUROC
# 0.969 against the digits, 1.000 against noise (81% and 100% rejected at 95% coverage; README)
SUGGEST_SCORE = "mahalanobis"
STORED_SUFFIX = ".openset.json"
STORED_FORMAT = "imgcls-openset"


def confidence(logits: torch.Tensor, score: str = DEFAULT_SCORE, multilabel: bool = False) -> torch.Tensor:
    """One confidence per row of ``logits`` (N x C), higher = more in-distribution."""
    x = logits.detach().float()
    if score == "msp":
        return (torch.sigmoid(x) if multilabel else torch.softmax(x, dim=1)).amax(dim=1)
    if score == "max-logit":
        return x.amax(dim=1)
    if score == "energy":
        return torch.nn.functional.softplus(x).sum(dim=1) if multilabel else torch.logsumexp(x, dim=1)
    raise UsageError(f"unknown score '{score}'; choose one of {', '.join(SCORES)}")


class FeatureScorer(Protocol):
    def confidence(self, features: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Rejection:
    """Answer ``unknown`` when the ``score`` is below ``threshold``."""

    threshold: float
    score: str = DEFAULT_SCORE
    source: str = "--min-confidence"  # where the threshold came from, for the log
    scorer: FeatureScorer | None = None  # a feature score's statistics

    def scored_by(self, scorer: FeatureScorer) -> Rejection:
        return replace(self, scorer=scorer)

    def scores(
        self, logits: torch.Tensor, features: torch.Tensor | None, multilabel: bool = False
    ) -> torch.Tensor:
        """The score of each row: from the logits, or (a feature score) from ``features``."""
        if self.score not in FEATURE_SCORES:
            return confidence(logits, self.score, multilabel)
        if self.scorer is None or features is None:
            raise ValueError(f"the {self.score} score needs its statistics and the batch's features")
        return self.scorer.confidence(features)

    def unknown(
        self,
        logits: torch.Tensor,
        labelled: list[bool] | None = None,
        multilabel: bool = False,
        features: torch.Tensor | None = None,
    ) -> list[bool]:
        """Per row of ``logits``: unknown or not. Multi-label: ``labelled`` says
        which rows have at least one label on (those are never unknown)."""
        return self.judge(logits, labelled, multilabel, features)[0]

    def judge(
        self,
        logits: torch.Tensor,
        labelled: list[bool] | None = None,
        multilabel: bool = False,
        features: torch.Tensor | None = None,
    ) -> tuple[list[bool], list[float]]:
        """Per row of a batch's ``logits``: (unknown or not, the score it was judged by).
        What a server calls per batch (``labelled``: multi-label rows with a label on;
        ``features``: the classifier layer's inputs, for a feature score)."""
        conf = self.scores(logits, features, multilabel)
        scores, low = conf.tolist(), (conf < self.threshold).tolist()  # compared as evaluate does
        if multilabel:
            if labelled is None:
                raise ValueError("multi-label rejection needs which rows have a label")
            return [lo and not on for lo, on in zip(low, labelled, strict=True)], scores
        return low, scores

    def describe(self) -> str:
        return f"{self.score} below {self.threshold:.6g} ({self.source})"


def rejection_for(source: str, value: str | None, score: str | None) -> Rejection | None:
    """``--min-confidence VALUE [--score S]`` for the model loaded from ``source`` (the
    predictor's): None when not asked; ``run``: the threshold stored beside a checkpoint."""
    number, stored = parse_min_confidence(value, score)
    if stored is None:
        return None if number is None else Rejection(number, score or DEFAULT_SCORE)
    path = Path(source)
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        raise UsageError(
            f"--min-confidence run: the threshold is stored beside a checkpoint ({STORED_SUFFIX}), "
            f"and {source} is not one; give the number instead (--min-confidence 0.9)"
        )
    return stored_rejection(path, score)


def parse_min_confidence(value: str | None, score: str | None) -> tuple[float | None, str | None]:
    """``--min-confidence`` as given: (a number, None), (None, "run"), or (None, None).

    A number must be a probability when the score is ``msp``; the score must be known."""
    if score is not None and score not in ALL_SCORES:
        raise UsageError(f"--score {score}: choose one of {', '.join(ALL_SCORES)}")
    if value is None:
        if score is not None:
            raise UsageError("--score chooses the score that --min-confidence thresholds: give both")
        return None, None
    if value.strip().lower() == "run":
        return None, "run"
    try:
        number = float(value)
    except ValueError:
        raise UsageError(
            f"--min-confidence {value}: give a number (a probability for msp) or 'run' "
            "(the threshold `imgcls evaluate --suggest-threshold` stored)"
        ) from None
    if not math.isfinite(number):
        raise UsageError(f"--min-confidence {value}: not a finite number")
    if (score or DEFAULT_SCORE) == "msp" and not 0.0 <= number <= 1.0:
        raise UsageError(f"--min-confidence {value}: the msp score is a probability: give a value in [0, 1]")
    return number, None


# --------------------------------------------------------------------------- curves


def risk_coverage(
    scores: torch.Tensor, correct: torch.Tensor
) -> tuple[list[float], list[float], list[float]]:
    """(coverage, risk, threshold) at each distinct score, most confident first.

    Accepting every image whose score is at or above ``threshold[i]`` keeps
    ``coverage[i]`` of them, of which ``risk[i]`` are wrong."""
    n = len(scores)
    if n == 0:
        return [], [], []
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, wrong = scores.double()[order], (~correct.bool()[order]).double()
    errors = wrong.cumsum(0)
    last = torch.ones(n, dtype=torch.bool)  # the last image of each run of equal scores
    last[:-1] = s[1:] != s[:-1]
    kept = torch.nonzero(last).flatten()
    count = (kept + 1).double()
    return (count / n).tolist(), (errors[kept] / count).tolist(), s[kept].tolist()


def aurc(scores: torch.Tensor, correct: torch.Tensor) -> float:
    """The area under the risk-coverage curve: the mean, over the coverages 1/n .. n/n,
    of the error rate of the most confident images (lower is better; about the error
    rate when the scores say nothing). Equal scores are one step."""
    coverage, risk, _ = risk_coverage(scores, correct)
    if not coverage:
        return float("nan")
    area, previous = 0.0, 0.0
    for c, r in zip(coverage, risk, strict=True):  # a step per distinct score
        area += (c - previous) * r
        previous = c
    return area


def auroc(inside: torch.Tensor, outside: torch.Tensor) -> float:
    """P(score of an in-distribution image > score of an outside one), ties counting
    half (the Mann-Whitney U statistic; scikit-learn's ``roc_auc_score``)."""
    n_in, n_out = len(inside), len(outside)
    if n_in == 0 or n_out == 0:
        return float("nan")
    both = torch.cat([inside.double(), outside.double()])
    values, inverse, counts = torch.unique(both, return_inverse=True, return_counts=True)
    first = counts.cumsum(0) - counts  # ranks (1-based) of each distinct value: average over ties
    average = first.double() + (counts.double() + 1) / 2
    rank_sum = average[inverse[:n_in]].sum().item()
    return (rank_sum - n_in * (n_in + 1) / 2) / (n_in * n_out)


def threshold_for_coverage(scores: torch.Tensor, coverage: float) -> float:
    """The largest threshold that keeps at least ``coverage`` of ``scores`` (accept: score >= it)."""
    if not 0.0 < coverage <= 1.0:
        raise UsageError(f"--coverage {coverage}: give a share in (0, 1], e.g. 0.95")
    if len(scores) == 0:
        raise UsageError("no validation images to pick a threshold on")
    keep = max(1, math.ceil(coverage * len(scores) - 1e-9))
    return float(torch.sort(scores.double(), descending=True).values[keep - 1])


def selective_summary(scores: torch.Tensor, correct: torch.Tensor, threshold: float) -> dict:
    """Coverage, and accuracy on the accepted images, at ``threshold``."""
    accepted = scores >= threshold
    n, kept = len(scores), int(accepted.sum())
    right = int(correct.bool()[accepted].sum())
    return {
        "threshold": threshold,
        "images": n,
        "accepted": kept,
        "coverage": kept / n if n else float("nan"),
        "accuracy_accepted": right / kept if kept else float("nan"),
        "accuracy_all": float(correct.float().mean()) if n else float("nan"),
    }


def selective_report(
    logits: torch.Tensor, targets: torch.Tensor, rejection: Rejection, features: torch.Tensor | None = None
) -> dict:
    """Single-label: coverage/accuracy at the rejection's threshold, AURC of every
    logit score (and of the rejection's), and the risk-coverage curve of the
    rejection's score (``features``: for a feature score)."""
    correct = logits.argmax(dim=1) == targets
    chosen = rejection.scores(logits, features)
    coverage, risk, thresholds = risk_coverage(chosen, correct)
    return {
        "score": rejection.score,
        "source": rejection.source,
        **selective_summary(chosen, correct, rejection.threshold),
        "aurc": aurc(chosen, correct),
        "aurc_by_score": {
            **{s: aurc(confidence(logits, s), correct) for s in SCORES},
            rejection.score: aurc(chosen, correct),
        },
        "curve": {"coverage": coverage, "risk": risk, "threshold": thresholds},
    }


# --------------------------------------------------------------------------- stored threshold


def stored_path(checkpoint: Path) -> Path:
    """``runs/x/1/best.safetensors`` -> ``runs/x/1/best.openset.json``."""
    return checkpoint.with_name(checkpoint.stem + STORED_SUFFIX)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stored_record(checkpoint: Path, rejection: Rejection, coverage: float, split: str, images: int) -> dict:
    return {
        "format": STORED_FORMAT,
        "score": rejection.score,
        "threshold": rejection.threshold,
        "coverage": coverage,
        "split": split,
        "images": images,
        "checkpoint": checkpoint.name,
        "sha256": file_digest(checkpoint),
    }


def stored_rejection(checkpoint: Path, score: str | None = None) -> Rejection:
    """The threshold ``evaluate --suggest-threshold`` stored for ``checkpoint``, checked
    to be for these very weights and metadata (a recalibrated or retrained checkpoint
    needs a new one). ``score``: the score asked for, which must be the stored one."""
    path = stored_path(checkpoint)
    hint = f"pick one first: imgcls evaluate {checkpoint} --suggest-threshold"
    if not path.is_file():
        raise UsageError(f"--min-confidence run: {path} not found; {hint}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a readable threshold file ({exc}); {hint}") from None
    if not isinstance(record, dict) or record.get("format") != STORED_FORMAT:
        raise CheckpointError(f"{path}: not an imgcls threshold file; {hint}")
    threshold, kind = record.get("threshold"), record.get("score")
    if kind not in ALL_SCORES or isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise CheckpointError(
            f"{path}: score/threshold: expected one of {', '.join(ALL_SCORES)} and a number"
        )
    if not math.isfinite(threshold):
        raise CheckpointError(f"{path}: threshold: not a finite number")
    if record.get("sha256") != file_digest(checkpoint):
        raise UsageError(
            f"{path}: was picked for another version of {checkpoint.name} (it changed since, "
            f"e.g. recalibrated); {hint}"
        )
    if score is not None and score != kind:
        raise UsageError(
            f"--score {score}: the stored threshold ({path.name}) is for the {kind} score; "
            f"drop --score, or pick one for {score}: imgcls evaluate {checkpoint} --suggest-threshold --score {score}"
        )
    share = record.get("coverage")
    kept = f", picked to keep {share:.0%} of the validation images" if isinstance(share, float) else ""
    return Rejection(float(threshold), kind, f"{path.name}{kept}")
