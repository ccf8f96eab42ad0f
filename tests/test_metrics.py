"""Metrics on hand-made logits whose confusion matrix is written out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from imgcls.metrics import classification_report, confusion_matrix, top_k_accuracy

CLASSES = ["a", "b", "c"]
# 10 samples; confusion (rows true, columns predicted):
#   a: 4 0 0      precision a 4/5, b 2/4, c 1/1
#   b: 1 2 0      recall    a 4/4, b 2/3, c 1/3
#   c: 0 2 1
TRUE = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
PRED = [0, 0, 0, 0, 0, 1, 1, 2, 1, 1]


def _logits() -> torch.Tensor:
    # predicted class scores 3, true class 1 (so the truth is always in the top 2)
    logits = torch.zeros(10, 3)
    for i, (t, p) in enumerate(zip(TRUE, PRED, strict=True)):
        logits[i, p] += 3
        logits[i, t] += 1
    return logits


def test_confusion_matrix_by_hand():
    cm = confusion_matrix(torch.tensor(PRED), torch.tensor(TRUE), 3)
    assert cm.tolist() == [[4, 0, 0], [1, 2, 0], [0, 2, 1]]


def test_report_numbers_by_hand():
    r = classification_report(_logits(), torch.tensor(TRUE), CLASSES, top_k=5)
    assert r["samples"] == 10
    assert r["accuracy"] == pytest.approx(0.7)
    assert r["top_k"] == 3  # capped at the class count
    assert r["top_k_accuracy"] == pytest.approx(1.0)
    p, rec = [0.8, 0.5, 1.0], [1.0, 2 / 3, 1 / 3]
    f1 = [2 * a * b / (a + b) for a, b in zip(p, rec, strict=True)]
    support = [4, 3, 3]
    for row, pi, ri, fi, si in zip(r["per_class"], p, rec, f1, support, strict=True):
        assert row["precision"] == pytest.approx(pi)
        assert row["recall"] == pytest.approx(ri)
        assert row["f1"] == pytest.approx(fi)
        assert row["support"] == si
    assert r["macro"]["precision"] == pytest.approx(sum(p) / 3)
    assert r["macro"]["recall"] == pytest.approx(sum(rec) / 3)
    assert r["macro"]["f1"] == pytest.approx(sum(f1) / 3)
    assert r["weighted"]["precision"] == pytest.approx(0.77)
    assert r["weighted"]["recall"] == pytest.approx(0.7)
    assert r["weighted"]["f1"] == pytest.approx(sum(f * s for f, s in zip(f1, support, strict=True)) / 10)
    right = -math.log(math.exp(4) / (math.exp(4) + 2))  # logits (4, 0, 0)
    wrong = -math.log(math.e / (math.exp(3) + math.e + 1))  # true logit 1 of (3, 1, 0)
    assert r["loss"] == pytest.approx((7 * right + 3 * wrong) / 10, rel=1e-5)
    assert r["confused_pairs"][0] == {
        "true": "c",
        "predicted": "b",
        "count": 2,
        "share": pytest.approx(2 / 3),
    }
    assert r["confused_pairs"][1]["true"] == "b" and r["confused_pairs"][1]["predicted"] == "a"
    assert len(r["confused_pairs"]) == 2


def test_top_k_accuracy():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    target = torch.tensor([1, 0])
    assert top_k_accuracy(logits, target, 1) == 0.0
    assert top_k_accuracy(logits, target, 2) == 0.5
    assert top_k_accuracy(logits, target, 4) == 1.0


def test_macro_ignores_classes_absent_from_labels_and_predictions():
    # 3 model classes, the data only has a and b, every prediction right
    logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0]])
    r = classification_report(logits, torch.tensor([0, 1]), CLASSES)
    assert r["macro"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert r["per_class"][2]["support"] == 0


def test_never_predicted_class_has_zero_precision():
    logits = torch.tensor([[5.0, 0, 0], [5.0, 0, 0]])
    r = classification_report(logits, torch.tensor([0, 1]), CLASSES)
    assert r["per_class"][1]["precision"] == 0.0 and r["per_class"][1]["recall"] == 0.0
    assert r["macro"]["recall"] == pytest.approx(0.5)


def test_matches_sklearn():
    """scikit-learn is in the `test` extra: a missing one fails here rather than skipping unseen."""
    from sklearn import metrics

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=g)
    target = torch.randint(0, 5, (200,), generator=g)
    r = classification_report(logits, target, list("abcde"))
    pred = logits.argmax(1).numpy()
    for avg in ("macro", "weighted"):
        p, rec, f, _ = metrics.precision_recall_fscore_support(
            target.numpy(), pred, average=avg, zero_division=0
        )
        assert r[avg] == pytest.approx({"precision": p, "recall": rec, "f1": f})
