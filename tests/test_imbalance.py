"""Uneven classes: loss weights, the balanced sampler, the counts warning,
balanced accuracy in evaluate."""

from __future__ import annotations

import io
import json
import re

import pytest
import torch

from imgcls.errors import RecipeError
from imgcls.imbalance import balanced_order, class_weights, count_lines, loss_fn
from imgcls.metrics import balanced_accuracy, classification_report, confusion_matrix

LABELS = torch.tensor([0] * 200 + [1] * 10)  # 20:1


def test_auto_class_weights_are_inverse_frequency_normalised():
    w = class_weights("auto", ["big", "small"], [200, 10])
    assert w.tolist() == pytest.approx([210 / 400, 210 / 20])
    assert float((w * torch.tensor([200.0, 10.0])).sum() / 210) == pytest.approx(1.0)  # mean weight per image
    assert class_weights("none", ["a"], [3]) is None
    assert class_weights({"small": 5.0}, ["big", "small"], [200, 10]).tolist() == [1.0, 5.0]
    with pytest.raises(RecipeError, match="class 'smal' is not in the data"):
        class_weights({"smal": 5.0}, ["big", "small"], [200, 10])


def test_weighted_loss_counts_a_rare_class_mistake_more():
    logits = torch.tensor([[2.0, 0.0], [2.0, 0.0]])  # both predicted 'big'
    target = torch.tensor([0, 1])
    plain = loss_fn(None, 0.0, torch.device("cpu"))(logits, target)
    weighted = loss_fn(class_weights("auto", ["big", "small"], [200, 10]), 0.0, torch.device("cpu"))(
        logits, target
    )
    # each image's loss times its class's weight: the rare class's loss dominates
    assert float(weighted) > float(plain)


def test_balanced_sampler_draws_classes_equally_and_repeatably():
    order = balanced_order(LABELS, 2, torch.Generator().manual_seed(7))
    assert len(order) == len(LABELS)
    drawn = torch.bincount(LABELS[order], minlength=2).tolist()
    assert abs(drawn[0] - drawn[1]) < 40  # about 105 each, not 200:10
    assert drawn[1] > 60
    again = balanced_order(LABELS, 2, torch.Generator().manual_seed(7))
    assert torch.equal(order, again)  # a pure function of the seed: resumable
    assert not torch.equal(order, balanced_order(LABELS, 2, torch.Generator().manual_seed(8)))


def test_counts_warn_past_ten_to_one():
    assert "class_weights" not in count_lines("train", ["big", "small"], [200, 10])[1]
    lines = count_lines("train", ["big", "small"], [200, 10], hint=True)
    assert lines[0] == "train class counts: big 200, small 10"
    assert "imbalanced classes: 'big' has 200 images, 'small' 10 (20:1)" in lines[1]
    assert "train.class_weights: auto" in lines[1]
    assert len(count_lines("train", ["a", "b"], [100, 10])) == 1  # 10:1 is not > 10x


def test_balanced_accuracy_is_mean_recall_over_present_classes():
    pred = torch.tensor([0] * 210)  # always 'big'
    cm = confusion_matrix(pred, LABELS, 3)  # class 2 absent: not counted
    assert balanced_accuracy(cm) == pytest.approx(0.5)
    logits = torch.nn.functional.one_hot(pred, 3).float()
    report = classification_report(logits, LABELS, ["big", "small", "other"])
    assert report["accuracy"] == pytest.approx(200 / 210)
    assert report["balanced_accuracy"] == pytest.approx(0.5)


def test_evaluate_prints_counts_and_balanced_accuracy(tiny_checkpoint, shapes_folder, tmp_path):
    from rich.console import Console

    from imgcls.evaluate import evaluate, report_renderables

    lines = []
    result = evaluate(tiny_checkpoint, shapes_folder, out=tmp_path / "eval", log=lines.append)
    data = json.loads((tmp_path / "eval" / "metrics.json").read_text())  # what --json prints
    assert data["balanced_accuracy"] == pytest.approx(result.report["balanced_accuracy"])
    assert "evaluated class counts: circle 8, square 8, triangle 8" in lines
    console = Console(record=True, width=120, file=io.StringIO())
    for table in report_renderables(result):
        console.print(table)
    assert re.search(rf"balanced accuracy\s*│\s*{data['balanced_accuracy']:.4f}", console.export_text())
