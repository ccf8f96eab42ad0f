"""The ``knn`` open-set score: distance to the training images in the model's feature space.

Deep nearest neighbours (Sun et al., 2022): an image's *feature* is the input
of the classifier layer (:func:`imgcls.models.surgery.classifier_layer`; a
conv head's map averaged over space), L2-normalised. Its score is minus the
distance to its ``k``-th nearest training feature (``k`` = 50, at most the
number of training images): higher means more like the training data.

Chosen by measurement (README, "Unknown inputs"): on the quickstart, AUROC
1.000 against scikit-learn's digits and 1.000 against uniform noise (both
100% rejected at the threshold keeping 95% of validation), where every logit
score calls noise more familiar than the model's own images (AUROC <= 0.006)
and Mahalanobis distance (class means, one shared covariance; Lee et al.,
2018) rejects no digit (AUROC 0.686).

The training features (the *statistics*) are fitted once, where the
threshold is picked (``imgcls evaluate --suggest-threshold --score knn``), and
stored beside the checkpoint (``best.openset.safetensors``, no pickle) with the
checkpoint's sha256: statistics of other weights are refused. An exported
model gives no features: the score is refused for it in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from imgcls.errors import CheckpointError, UsageError
from imgcls.io import atomic_path
from imgcls.openset import FEATURE_SCORES, Rejection, file_digest

KNN_K = 50
STATS_SUFFIX = ".openset.safetensors"
STATS_FORMAT = "imgcls-openset-knn"
_CHUNK = 1024  # images per distance block: N x bank floats at a time


@dataclass(frozen=True)
class KnnStatistics:
    """L2-normalised training features (``bank``, N x D) and ``k``."""

    bank: torch.Tensor
    k: int = KNN_K

    def confidence(self, features: torch.Tensor) -> torch.Tensor:
        """Minus the distance of each (normalised) row of ``features`` to its k-th nearest in the bank."""
        k = max(1, min(self.k, len(self.bank)))
        z = torch.nn.functional.normalize(features.detach().float(), dim=1)
        out = [
            -torch.cdist(block, self.bank).topk(k, dim=1, largest=False).values[:, -1]
            for block in z.split(_CHUNK)
        ]
        return torch.cat(out) if out else torch.empty(0)


def fit_knn(features: torch.Tensor, k: int = KNN_K) -> KnnStatistics:
    """The statistics of ``features`` (one row per training image)."""
    if len(features) == 0:
        raise UsageError("--score knn: no training images to fit the feature statistics on")
    bank = torch.nn.functional.normalize(features.detach().float(), dim=1).contiguous()
    return KnnStatistics(bank, min(k, len(bank)))


class HeadInputs:
    """Records the input of a torch model's classifier layer while it runs (a
    context manager: the hook is removed on exit). :meth:`take` gives a
    batch's features (test-time augmentation: the mean of its passes)."""

    def __init__(self, model: torch.nn.Module):
        from imgcls.models.surgery import classifier_layer

        self.calls: list[torch.Tensor] = []
        self._handle = classifier_layer(model).register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        x = args[0].detach().float()
        self.calls.append(x.mean(dim=(2, 3)) if x.ndim == 4 else x.flatten(1))

    def take(self) -> torch.Tensor:
        if not self.calls:
            raise UsageError("--score knn: the model's classifier layer did not run: no features to score")
        out = torch.stack(self.calls).mean(dim=0) if len(self.calls) > 1 else self.calls[0]
        self.calls = []
        return out.cpu()

    def close(self) -> None:
        self._handle.remove()

    def __enter__(self) -> HeadInputs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- stored statistics


def stats_path(checkpoint: Path) -> Path:
    """``runs/x/1/best.safetensors`` -> ``runs/x/1/best.openset.safetensors``."""
    return checkpoint.with_name(checkpoint.stem + STATS_SUFFIX)


def save_statistics(checkpoint: Path, stats: KnnStatistics, split: str) -> Path:
    """Write ``stats`` beside ``checkpoint`` (atomically), tied to its sha256."""
    from safetensors.torch import save_file

    path = stats_path(checkpoint)
    meta = {
        "format": STATS_FORMAT,
        "score": "knn",
        "k": str(stats.k),
        "split": split,
        "checkpoint": checkpoint.name,
        "sha256": file_digest(checkpoint),
    }
    with atomic_path(path) as tmp:
        save_file({"bank": stats.bank}, str(tmp), metadata=meta)
    return path


def load_statistics(checkpoint: Path) -> KnnStatistics:
    """The statistics fitted for ``checkpoint``, checked to be for these very weights."""
    from safetensors import SafetensorError, safe_open

    path = stats_path(checkpoint)
    hint = f"fit them first: imgcls evaluate {checkpoint} --suggest-threshold --score knn"
    if not path.is_file():
        raise UsageError(f"--score knn: {path} not found; {hint}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            bank = f.get_tensor("bank") if "bank" in f.keys() else None  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError) as exc:
        raise CheckpointError(f"{path}: not a readable statistics file ({exc}); {hint}") from None
    if meta.get("format") != STATS_FORMAT or bank is None or bank.ndim != 2 or not len(bank):
        raise CheckpointError(f"{path}: not an imgcls knn statistics file; {hint}")
    if meta.get("sha256") != file_digest(checkpoint):
        raise UsageError(
            f"{path}: was fitted for another version of {checkpoint.name} (it changed since, "
            f"e.g. recalibrated); {hint}"
        )
    k = meta.get("k", "")
    return KnnStatistics(bank.float(), int(k) if k.isdigit() and int(k) > 0 else KNN_K)


def with_statistics(rejection: Rejection | None, model: object, source: str) -> Rejection | None:
    """``rejection`` with the feature statistics its score needs (unchanged for a logit
    score). ``model``: what predicts (a torch model, or an export: refused)."""
    if rejection is None or rejection.score not in FEATURE_SCORES:
        return rejection
    refuse_export(model, source, rejection.score)
    return rejection.scored_by(load_statistics(Path(source)))


def refuse_export(model: object, source: str, score: str | None) -> None:
    """One line (exit 2) when a feature score is asked of a model that gives no features."""
    checkpoint = Path(source).suffix.lower() == ".safetensors"
    if score in FEATURE_SCORES and not (checkpoint and isinstance(model, torch.nn.Module)):
        raise UsageError(
            f"--score {score} needs the model's features, which an exported model ({source}) does not "
            "give: use its checkpoint, or a logit score (msp, max-logit, energy)"
        )
