"""Multi-label: CSV labels, BCE training, metrics (checked against scikit-learn),
tuned thresholds, predict and export keeping the semantics."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL_CNN
from PIL import Image

from imgcls.data.shapes import draw_shape
from imgcls.data.sources import read_csv
from imgcls.errors import CheckpointError, DataError
from imgcls.metadata import check_task
from imgcls.metrics import (
    average_precision,
    f1_optimal_thresholds,
    multilabel_f1,
    multilabel_report,
)

KINDS = ["circle", "square", "triangle", "cross"]
CELL = 8


def write_multilabel(root: Path, n: int, seed: int = 0, first_only: bool = False) -> Path:
    """Images of 2x2 cells, two or three of them holding a shape (class k's
    shape always in cell k, so a tiny network learns it in a few epochs: the
    test is about the multi-label path, not shape recognition); one CSV row per
    image, labels joined by ';' (or only the first label, ``first_only``)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["file,labels"]
    for i in range(n):
        kinds = sorted(rng.choice(len(KINDS), int(rng.integers(2, 4)), replace=False).tolist())
        canvas = np.zeros((2 * CELL, 2 * CELL, 3), np.uint8)
        for k in kinds:
            r, c = divmod(k, 2)
            canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = draw_shape(KINDS[k], CELL, rng)
        Image.fromarray(canvas).save(root / "img" / f"{i}.png")
        names = [KINDS[k] for k in rng.permutation(kinds)]
        lines.append(f"img/{i}.png,{names[0] if first_only else ';'.join(names)}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


def recipe(csv_path: Path, out: Path, **data) -> dict:
    return {
        "name": "ml",
        "data": {"source": "csv", "path": str(csv_path), "image_size": 2 * CELL, **data},
        "model": {"layers": copy.deepcopy(SMALL_CNN)},
        "train": {"epochs": 6, "batch_size": 16, "optimizer": {"lr": 0.003}, "out": str(out)},
    }


# --------------------------------------------------------------------------- CSV


def _csv(tmp_path: Path, rows: list[str]) -> Path:
    for row in rows:
        name = row.split(",")[0]
        if name.endswith(".png"):
            Image.new("RGB", (4, 4)).save(tmp_path / name)
    path = tmp_path / "labels.csv"
    path.write_text("file,labels\n" + "\n".join(rows) + "\n")
    return path


def test_csv_several_labels_make_a_multilabel_source(tmp_path):
    path = _csv(tmp_path, ["a.png,dog;cat", "b.png,cat|bird", "c.png,dog", "d.png,bird;dog,val"])
    source = read_csv(path, 0.2, 0)
    assert source.task == "multilabel"
    assert source.classes == ["bird", "cat", "dog"]
    assert [hot for _, hot in source.train] == [(0, 1, 1), (1, 1, 0), (0, 0, 1)]
    assert [hot for _, hot in source.val] == [(1, 0, 1)]


def test_single_label_csv_stays_single(tmp_path):
    path = _csv(tmp_path, ["a.png,dog", "b.png,cat", "c.png,dog,val", "d.png,cat,val"])
    source = read_csv(path, 0.2, 0)
    assert source.task == "single"
    assert [label for _, label in source.train] == [1, 0]


def test_task_single_refuses_a_row_with_several_labels(tmp_path):
    path = _csv(tmp_path, ["a.png,dog", "b.png,cat;dog"])
    with pytest.raises(DataError, match=r"labels.csv:3: 'cat;dog' holds several labels"):
        read_csv(path, 0.2, 0, "single")


def test_empty_label_between_separators_is_an_error(tmp_path):
    path = _csv(tmp_path, ["a.png,dog;;cat", "b.png,cat"])
    with pytest.raises(DataError, match=r"labels.csv:2: empty label"):
        read_csv(path, 0.2, 0)


def test_multilabel_rows_without_a_label_are_negatives(tmp_path, monkeypatch):
    """An empty labels cell used to fail the run ("empty file name or label"):
    in multi-label data it is an image with no positive label."""
    from imgcls.data.prepare import prepare_data
    from imgcls.recipe import DataSpec

    rows = ["a.png,dog;cat", "b.png,", "c.png,cat", "d.png,dog", "e.png,,val", "f.png,cat;dog,val"]
    path = _csv(tmp_path, rows)
    source = read_csv(path, 0.2, 0)
    assert source.task == "multilabel"  # detected from the other rows
    assert [hot for _, hot in source.train] == [(1, 1), (0, 0), (1, 0), (0, 1)]
    assert [hot for _, hot in source.val] == [(0, 0), (1, 1)]
    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "cache"))
    logs: list[str] = []
    prepare_data(DataSpec(source="csv", path=str(path), image_size=4), log=logs.append)
    (summary,) = [line for line in logs if line.startswith("data: ")]
    assert ", 2 with no label (a negative for every class)" in summary, summary

    single = _csv(tmp_path, ["a.png,dog", "b.png,", "c.png,cat"])
    assert [hot for _, hot in read_csv(single, 0, 0, "multilabel").train] == [(0, 1), (0, 0), (1, 0)]
    with pytest.raises(DataError, match=r"labels.csv:3: empty label; .*set data.task: multilabel"):
        read_csv(single, 0, 0)
    with pytest.raises(DataError, match=r"labels.csv:3: empty label; .*data.task is single"):
        read_csv(single, 0, 0, "single")
    no_name = _csv(tmp_path, ["a.png,dog;cat", ",cat", "c.png,cat"])
    with pytest.raises(DataError, match=r"labels.csv:3: empty file name$"):
        read_csv(no_name, 0, 0)


def test_metadata_rules_for_task_and_thresholds():
    meta = {"classes": ["a", "b"], "task": "multilabel", "thresholds": [0.3, 0.7]}
    check_task(meta, "m")
    with pytest.raises(CheckpointError, match="task: 'multi'"):
        check_task({**meta, "task": "multi"}, "m")
    with pytest.raises(CheckpointError, match=r"thresholds\[1\]: 1.5"):
        check_task({**meta, "thresholds": [0.3, 1.5]}, "m")
    with pytest.raises(CheckpointError, match="one per class"):
        check_task({**meta, "thresholds": [0.3]}, "m")
    with pytest.raises(CheckpointError, match="only a multilabel"):
        check_task({"classes": ["a", "b"], "thresholds": [0.5, 0.5]}, "m")


# --------------------------------------------------------------------------- metrics


def test_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, average_precision_score, f1_score, precision_score

    g = torch.Generator().manual_seed(0)
    target = torch.rand(60, 5, generator=g) > 0.6
    probs = torch.rand(60, 5, generator=g)
    probs[:10] = 0.5  # ties
    target[:, 4] = False  # a class with no positive label
    pred = probs >= 0.5
    stats = multilabel_f1(pred, target)
    y, p = target.numpy(), pred.numpy()
    assert stats["macro"] == pytest.approx(f1_score(y, p, average="macro", zero_division=0))
    assert stats["micro"] == pytest.approx(f1_score(y, p, average="micro", zero_division=0))
    assert stats["precision"].numpy() == pytest.approx(precision_score(y, p, average=None, zero_division=0))
    ap = average_precision(probs, target)
    assert ap[:4].numpy() == pytest.approx(
        average_precision_score(y[:, :4], probs[:, :4].numpy(), average=None)
    )
    assert torch.isnan(ap[4])
    report = multilabel_report(probs, target, list("abcde"), [0.5] * 5)
    assert report["exact_match"] == pytest.approx(accuracy_score(y, p))
    assert report["mAP"] == pytest.approx(float(ap[:4].mean()))


def test_tuned_thresholds_are_f1_optimal():
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(1)
    target = torch.rand(80, 3, generator=g) > 0.5
    probs = (target.float() * 0.3 + torch.rand(80, 3, generator=g) * 0.7).clamp(0, 1)
    tuned = f1_optimal_thresholds(probs, target)
    for k in range(3):
        best = max(f1_score(target[:, k], probs[:, k] >= t) for t in probs[:, k].tolist())
        assert f1_score(target[:, k], probs[:, k] >= tuned[k]) == pytest.approx(best)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One multi-label run and one softmax run on the same images (first label only)."""
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    root = tmp_path_factory.mktemp("multilabel")
    csv_path = write_multilabel(root / "data", 160)
    first = write_multilabel(root / "first", 160, first_only=True)
    logs: list[str] = []
    multi = train(recipe_from_dict(recipe(csv_path, root / "runs")), out=root / "multi", log=logs.append)
    single = train(recipe_from_dict(recipe(first, root / "runs")), out=root / "single", log=lambda m: None)
    return {"csv": csv_path, "multi": multi, "single": single, "logs": logs, "root": root}


@pytest.mark.slow
def test_multilabel_model_beats_softmax(trained):
    from imgcls.evaluate import evaluate
    from imgcls.metrics import multilabel_f1

    assert any("several labels" in line for line in trained["logs"])
    assert "val_f1" in trained["multi"].history[-1]
    multi = evaluate(trained["multi"].run_dir, log=lambda m: None)
    assert multi.report["macro_f1"] >= 0.9, multi.report
    # the softmax model, judged on the full label sets: one label per image cannot cover two or three
    with pytest.raises(DataError, match="single-label model"):
        evaluate(trained["single"].run_dir, trained["csv"], log=lambda m: None, out=trained["root"] / "e")
    from imgcls.checkpoint import load_checkpoint
    from imgcls.evaluate import class_index, read_labels_csv
    from imgcls.evaluate import score_items as _run

    ckpt = load_checkpoint(trained["single"].run_dir)
    items = read_labels_csv(trained["csv"])
    # score the softmax model's top-1 label as a set of one against the true sets
    multi_ckpt = load_checkpoint(trained["multi"].run_dir)
    index = class_index(multi_ckpt.classes, set(KINDS), "csv")
    scores, _, target, _, _ = _run(ckpt, items, index, 64, True)
    top1 = torch.nn.functional.one_hot(scores.argmax(1), len(KINDS)).bool()
    assert multilabel_f1(top1, target)["macro"] < 0.9


@pytest.mark.slow
def test_tune_predict_and_export_keep_multilabel_semantics(trained, cli, tmp_path):
    from imgcls.export.writers import export_model
    from imgcls.predict import predict_files
    from imgcls.predictor import load_predictor

    run = trained["multi"].run_dir
    r = cli("evaluate", str(run), "--tune-thresholds", "--tta", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    tuned = Path(report["files"]["tuned_checkpoint"])
    assert tuned.name == "best-tuned.safetensors" and tuned.is_file()
    thresholds = [row["threshold"] for row in report["per_class"]]
    assert thresholds != [0.5] * len(KINDS)
    for key in ("macro_f1", "micro_f1", "mAP", "exact_match"):
        assert 0 <= report[key] <= 1 and 0 <= report["tta"][key] <= 1
    onnx = tmp_path / "m.onnx"
    export_model(tuned, "onnx", onnx)
    images = sorted((trained["csv"].parent / "img").glob("*.png"))[:6]
    decided = []
    for model in (tuned, onnx):
        predictor = load_predictor(model, log=lambda m: None)
        assert predictor.task == "multilabel" and predictor.thresholds == pytest.approx(thresholds)
        records = list(predict_files(predictor, images))
        for rec in records:
            assert all(p >= thresholds[KINDS.index(label)] for label, p in rec.labels)
            assert rec.to_dict()["labels"] == [{"label": label, "p": p} for label, p in rec.labels]
        decided.append([[label for label, _ in rec.labels] for rec in records])
    assert decided[0] == decided[1]
    assert sum(len(labels) >= 2 for labels in decided[0]) >= 4  # most images: several labels


@pytest.mark.slow
def test_a_multilabel_run_gets_a_temperature_per_class(trained, tmp_path):
    """imgcls.calibration: train fits one temperature per class on the sigmoid
    BCE of the validation split; evaluate reports the calibration with it."""
    from imgcls.checkpoint import read_meta
    from imgcls.evaluate import evaluate

    run = trained["multi"].run_dir
    stored = read_meta(run / "best.safetensors")["calibration"]
    t = stored["temperature"]
    assert isinstance(t, list) and len(t) == len(KINDS) and all(0.05 <= v <= 20 for v in t)
    assert stored == trained["multi"].calibration and stored["nll_after"] <= stored["nll_before"]
    result = evaluate(run, log=lambda m: None, out=tmp_path / "eval")
    cal = result.report["calibration"]
    assert cal["temperature"] == t and (tmp_path / "eval" / "reliability.png").is_file()
    assert cal["after"]["nll"] <= cal["before"]["nll"]  # on the split it was fitted on
    assert cal["after"]["nll"] == pytest.approx(stored["nll_after"], abs=1e-5)


def test_predict_csv_lists_the_labels(tiny_multilabel_checkpoint, shapes_folder, cli):
    image = next(shapes_folder.rglob("*.png"))
    r = cli("predict", str(image), "--model", str(tiny_multilabel_checkpoint), "--csv", "--threshold", "0")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert header == "file,labels,probabilities,error"
    assert row.split(",")[1] == "circle;square;triangle" or sorted(row.split(",")[1].split(";")) == [
        "circle",
        "square",
        "triangle",
    ]
    assert "multi-label model" in r.stderr


@pytest.fixture(scope="module")
def tiny_multilabel_checkpoint(tiny_checkpoint, tmp_path_factory):
    """conftest's tiny checkpoint, relabelled as a multi-label model."""
    from imgcls.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    path = tmp_path_factory.mktemp("ml-ckpt") / "tiny-ml.safetensors"
    save_checkpoint(path, ckpt.model, {**ckpt.meta, "task": "multilabel"})
    return path


def test_train_closing_line_shows_val_f1_for_multilabel(tmp_path):
    """The best multi-label checkpoint is chosen on val_f1: the closing line and --json name it."""
    from imgcls.cli.render import train_closing as _train_closing
    from imgcls.cli.render import train_summary as _train_summary
    from imgcls.training import TrainResult

    row = {"epoch": 2, "train_loss": 0.3, "train_acc": 0.5, "val_loss": 0.25, "val_acc": 0.4, "val_f1": 0.875}
    multi = _train_summary(TrainResult(tmp_path, [row, row], 2, row, False))
    assert multi["val_f1"] == 0.875
    assert _train_closing(multi).splitlines() == [
        "best epoch 2: val_f1 0.8750, val_acc (exact match) 0.4000, val_loss 0.2500",
        f"run folder: {tmp_path}",
    ]
    single_row = {k: v for k, v in row.items() if k != "val_f1"}
    single = _train_summary(TrainResult(tmp_path, [single_row], 1, single_row, False))
    assert "val_f1" not in single
    assert _train_closing(single).splitlines()[0] == "best epoch 1: val_acc 0.4000, val_loss 0.2500"


def test_explain_matches_predict_on_a_multilabel_model(tiny_checkpoint, shapes_folder, cli, tmp_path):
    """explain used a softmax on every model: on a multi-label one its
    probability and predicted class differed from predict's sigmoid per class."""
    from imgcls.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    model = tmp_path / "ml.safetensors"
    # circle always on, square never, triangle as the sigmoid says
    save_checkpoint(model, ckpt.model, {**ckpt.meta, "task": "multilabel", "thresholds": [0.0, 1.0, 0.5]})
    images = [str(p) for p in sorted(shapes_folder.rglob("*.png"))[::6]]
    p = cli("predict", *images, "--model", str(model), "--json")
    assert p.returncode == 0, p.stderr
    predicted = {r["file"]: r["labels"] for r in map(json.loads, p.stdout.splitlines())}
    e = cli("explain", *images, "--model", str(model), "--out", str(tmp_path / "x"), "--json")
    assert e.returncode == 0, e.stderr
    explained = json.loads(e.stdout)["images"]
    assert [x["file"] for x in explained] == images
    for x in explained:
        labels = predicted[x["file"]]
        assert labels and labels[0]["label"] == "circle"
        assert x["labels"] == labels
        assert x["predicted"] == ";".join(r["label"] for r in labels)
        assert x["probability"] == pytest.approx(labels[0]["p"], abs=1e-6)
        # each predicted label explained, at the probability predict gives it
        assert [(t["class"], t["probability"]) for t in x["targets"]] == [
            (r["label"], pytest.approx(r["p"], abs=1e-6)) for r in labels
        ]


def test_evaluate_reads_rows_without_a_label_as_negatives(
    tiny_multilabel_checkpoint, tiny_checkpoint, shapes_folder, cli, tmp_path
):
    rows = [f"{shapes_folder}/circle/circle_0000.png,circle", f"{shapes_folder}/square/square_0000.png,"]
    labels = tmp_path / "l.csv"
    labels.write_text("file,labels\n" + "\n".join(rows) + "\n")
    out = tmp_path / "e"
    r = cli("evaluate", str(tiny_multilabel_checkpoint), str(labels), "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["samples"] == 2
    assert [row["support"] for row in report["per_class"]] == [1, 0, 0]
    single = cli("evaluate", str(tiny_checkpoint), str(labels), "--out", str(out))
    assert single.returncode == 2 and "rows with no label" in single.stderr, single.stderr
