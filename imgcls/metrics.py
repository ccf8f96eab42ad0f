"""Classification metrics as pure tensor functions: logits and labels in, numbers out.

No I/O and no model: evaluate feeds the logits, these count. Conventions
(the same as scikit-learn's ``zero_division=0``): a class never predicted
has precision 0, a class absent from the labels has recall 0 and support 0;
macro averages weigh every class equally, weighted averages by support.
The confusion matrix is ``cm[true, predicted]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 (num_classes, num_classes): rows are true classes, columns predictions."""
    index = target.long() * num_classes + pred.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    if len(target) == 0:
        return 0.0
    return float((logits.argmax(1) == target).float().mean())


def balanced_accuracy(cm: torch.Tensor) -> float:
    """Mean recall over the classes present in the labels (scikit-learn's
    ``balanced_accuracy_score``): every class counts the same however many
    images it has, so a model that ignores a rare class cannot score high."""
    support = cm.sum(1)
    present = support > 0
    if not bool(present.any()):
        return 0.0
    recall = cm.diag().double()[present] / support[present].double()
    return float(recall.mean())


def top_k_accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Share of samples whose true class is among the ``k`` highest logits."""
    if len(target) == 0:
        return 0.0
    k = max(1, min(k, logits.shape[1]))
    top = logits.topk(k, dim=1).indices
    return float((top == target.view(-1, 1)).any(1).float().mean())


def mean_loss(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Mean cross entropy (natural log)."""
    if len(target) == 0:
        return 0.0
    return float(F.cross_entropy(logits.float(), target.long()))


def per_class(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Precision, recall, F1 and support per class from a confusion matrix."""
    cm = cm.double()
    tp = cm.diag()
    predicted = cm.sum(0)
    support = cm.sum(1)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), torch.zeros_like(tp))
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.long(),
        "predicted": predicted.long(),
    }


def averages(stats: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Macro (plain mean over classes) and weighted (by support) P/R/F1.

    The macro mean runs over the classes that occur in the labels or the
    predictions (scikit-learn's default), so evaluating on data with a subset
    of the model's classes is not dragged down by classes that are not there.
    """
    support = stats["support"].double()
    present = (stats["support"] > 0) | (stats["predicted"] > 0)
    total = float(support.sum())
    out: dict[str, dict[str, float]] = {"macro": {}, "weighted": {}}
    for key in ("precision", "recall", "f1"):
        values = stats[key]
        out["macro"][key] = float(values[present].mean()) if bool(present.any()) else 0.0
        out["weighted"][key] = float((values * support).sum() / total) if total else 0.0
    return out


def confused_pairs(cm: torch.Tensor, classes: Sequence[str], limit: int = 10) -> list[dict]:
    """The most frequent mistakes, true→predicted, largest first.

    ``share`` is the fraction of the true class's samples that went to that
    prediction (how often a circle is called a square).
    """
    support = cm.sum(1)
    off = cm.clone()
    off.fill_diagonal_(0)
    pairs: list[dict] = []
    for flat in torch.argsort(off.flatten(), descending=True, stable=True).tolist():
        t, p = divmod(flat, cm.shape[1])
        count = int(off[t, p])
        if count == 0 or len(pairs) >= limit:
            break
        pairs.append(
            {"true": classes[t], "predicted": classes[p], "count": count, "share": count / int(support[t])}
        )
    return pairs


def classification_report(
    logits: torch.Tensor,
    target: torch.Tensor,
    classes: Sequence[str],
    top_k: int = 5,
    pairs: int = 10,
) -> dict:
    """Every metric evaluate prints, as plain JSON-ready values."""
    n = len(classes)
    k = max(1, min(top_k, n))
    cm = confusion_matrix(logits.argmax(1), target, n)
    stats = per_class(cm)
    avg = averages(stats)
    return {
        "samples": len(target),
        "accuracy": accuracy(logits, target),
        "balanced_accuracy": balanced_accuracy(cm),
        "top_k": k,
        "top_k_accuracy": top_k_accuracy(logits, target, k),
        "loss": mean_loss(logits, target),
        "macro": avg["macro"],
        "weighted": avg["weighted"],
        "per_class": [
            {
                "class": name,
                "precision": float(stats["precision"][i]),
                "recall": float(stats["recall"][i]),
                "f1": float(stats["f1"][i]),
                "support": int(stats["support"][i]),
            }
            for i, name in enumerate(classes)
        ],
        "classes": list(classes),
        "confusion": cm.tolist(),
        "confused_pairs": confused_pairs(cm, classes, pairs),
    }


# --------------------------------------------------------------------------- multi-label
#
# Multi-label: ``target`` is (N, K) multi-hot (bool or 0/1), ``scores`` are
# (N, K) sigmoid probabilities (or logits: only their order matters for AP).
# A label is predicted when its probability is >= its class's threshold.
# Macro averages run over every class (scikit-learn's multi-label default),
# micro averages pool every (image, class) decision.


def multilabel_decisions(probs: torch.Tensor, thresholds: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """bool (N, K): label k is on where ``probs[:, k] >= thresholds[k]``."""
    t = torch.as_tensor(thresholds, dtype=probs.dtype, device=probs.device)
    return probs >= t


def multilabel_f1(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """Per-class precision / recall / F1 / support and micro and macro F1 of
    bool decisions ``pred`` against ``target``, both (N, K)."""
    pred, target = pred.bool(), target.bool()
    tp = (pred & target).sum(0).double()
    predicted = pred.sum(0).double()
    support = target.sum(0).double()
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros_like(tp))
    denom = predicted + support
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp))
    all_denom = float(denom.sum())
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support.long(),
        "micro": 2 * float(tp.sum()) / all_denom if all_denom else 0.0,
        "macro": float(f1.mean()) if len(f1) else 0.0,
    }


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float64 (K,): per class, the area under the precision-recall curve as
    scikit-learn's ``average_precision_score`` computes it (sum over distinct
    thresholds of recall gained x precision there); NaN for a class with no
    positive label."""
    scores, target = scores.double(), target.bool()
    out = torch.full((scores.shape[1],), float("nan"), dtype=torch.float64)
    for k in range(scores.shape[1]):
        positives = int(target[:, k].sum())
        if positives == 0:
            continue
        s, order = torch.sort(scores[:, k], descending=True, stable=True)
        hits = target[order, k].double()
        tp = hits.cumsum(0)
        # the last row of each group of tied scores: one point per distinct threshold
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[:-1] != s[1:]
        tp_at = tp[last]
        seen = torch.arange(1, len(s) + 1, dtype=torch.float64)[last]
        precision = tp_at / seen
        recall = tp_at / positives
        gained = torch.diff(recall, prepend=torch.zeros(1, dtype=torch.float64))
        out[k] = (gained * precision).sum()
    return out


def f1_optimal_thresholds(probs: torch.Tensor, target: torch.Tensor, default: float = 0.5) -> list[float]:
    """Per class, the threshold that maximises F1 on (``probs``, ``target``).

    The threshold sits halfway between the lowest probability kept on and the
    next lower one (not on a seen value, so a new image with the same score
    as a tuning one is decided the same way, with a margin on both sides).
    A class without a positive label keeps ``default``.
    """
    probs, target = probs.double(), target.bool()
    out: list[float] = []
    for k in range(probs.shape[1]):
        positives = int(target[:, k].sum())
        if positives == 0:
            out.append(default)
            continue
        s, order = torch.sort(probs[:, k], descending=True, stable=True)
        tp = target[order, k].double().cumsum(0)
        last = torch.ones_like(s, dtype=torch.bool)
        last[:-1] = s[:-1] != s[1:]
        index = torch.nonzero(last).flatten()
        f1 = 2 * tp[index] / (index.double() + 1 + positives)
        best = int(index[int(torch.argmax(f1))])  # the first (highest threshold) of equal F1s
        below = float(s[best + 1]) if best + 1 < len(s) else 0.0
        out.append((float(s[best]) + below) / 2)
    return out


def multilabel_report(probs: torch.Tensor, target: torch.Tensor, classes: Sequence[str], thresholds) -> dict:
    """Every multi-label metric evaluate prints, as plain JSON-ready values:
    per-class P/R/F1 at the thresholds and AP, micro/macro F1, mAP (mean AP
    over classes with a positive label), exact-match ratio, mean BCE loss."""
    target = target.bool()
    pred = multilabel_decisions(probs, thresholds)
    stats = multilabel_f1(pred, target)
    ap = average_precision(probs, target)
    known = ~torch.isnan(ap)
    p = probs.double().clamp(1e-12, 1 - 1e-12)
    loss = -(target * p.log() + (~target) * (1 - p).log()).mean() if len(target) else torch.tensor(0.0)
    thresholds = [float(t) for t in torch.as_tensor(thresholds, dtype=torch.float64).tolist()]
    return {
        "task": "multilabel",
        "samples": len(target),
        # scikit-learn's accuracy_score on multi-label data is this exact-match (subset) ratio
        "accuracy": float((pred == target).all(1).double().mean()) if len(target) else 0.0,
        "exact_match": float((pred == target).all(1).double().mean()) if len(target) else 0.0,
        "micro_f1": stats["micro"],
        "macro_f1": stats["macro"],
        "mAP": float(ap[known].mean()) if bool(known.any()) else 0.0,
        "loss": float(loss),
        "per_class": [
            {
                "class": name,
                "threshold": thresholds[i],
                "precision": float(stats["precision"][i]),
                "recall": float(stats["recall"][i]),
                "f1": float(stats["f1"][i]),
                "ap": None if not bool(known[i]) else float(ap[i]),
                "support": int(stats["support"][i]),
            }
            for i, name in enumerate(classes)
        ],
        "classes": list(classes),
    }
