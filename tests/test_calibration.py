"""Calibrated confidence: ECE / MCE / Brier against torchmetrics and
scikit-learn, the temperature fit, the acceptance on an over-confident model,
and the temperature through train, calibrate, predict, evaluate and export."""

from __future__ import annotations

import copy
import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, save_tiny_checkpoint

from imgcls import calibration as C


def _logits(seed: int, n: int = 600, k: int = 7) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g) * 3
    labels = torch.randint(0, k, (n,), generator=g)
    hot = (torch.rand(n, k, generator=g) < 0.3).float()
    return logits, labels, hot


# --------------------------------------------------------------------------- the metrics


@pytest.mark.parametrize("seed", [0, 1])
def test_ece_and_mce_match_torchmetrics(seed):
    from torchmetrics.classification import BinaryCalibrationError, MulticlassCalibrationError

    logits, labels, hot = _logits(seed)
    ours = C.calibration_metrics(logits, labels, multilabel=False)
    multi = C.calibration_metrics(logits, hot, multilabel=True)
    for norm, key in (("l1", "ece"), ("max", "mce")):
        ref = MulticlassCalibrationError(num_classes=7, n_bins=15, norm=norm)(logits.softmax(1), labels)
        assert ours[key] == pytest.approx(float(ref), abs=1e-6)
        pairs = BinaryCalibrationError(n_bins=15, norm=norm)(logits.sigmoid().flatten(), hot.flatten().long())
        assert multi[key] == pytest.approx(float(pairs), abs=1e-6)
    assert ours["nll"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert sum(b["count"] for b in ours["bins"]) == len(labels) and len(ours["bins"]) == 15


def test_brier_matches_scikit_learn():
    from sklearn.metrics import brier_score_loss

    logits, labels, hot = _logits(2)
    probs = logits.double().softmax(1).numpy()
    # sklearn's multiclass Brier: the mean over images of the summed squared errors (0..2)
    want = brier_score_loss(labels.numpy(), probs, labels=list(range(7)), scale_by_half=False)
    assert C.calibration_metrics(logits, labels, False)["brier"] == pytest.approx(want, rel=1e-9)
    pairs = brier_score_loss(hot.flatten().numpy(), logits.double().sigmoid().flatten().numpy())
    assert C.calibration_metrics(logits, hot, True)["brier"] == pytest.approx(pairs, rel=1e-9)


def test_the_fit_recovers_a_known_temperature():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(8000, 5, generator=g) * 2  # calibrated logits: labels drawn from their softmax
    labels = torch.multinomial(true.softmax(1), 1, generator=g).squeeze(1)
    for t in (2.5, 0.5):
        assert C.fit_temperature(true * t, labels, False) == pytest.approx(t, rel=0.06)
    # multi-label: one per class; a class with one outcome only keeps T = 1
    z = torch.randn(8000, 4, generator=g) * 2
    hot = torch.bernoulli(z.sigmoid(), generator=g)
    hot[:, 3] = 0
    fitted = C.fit_temperature(z * torch.tensor([0.5, 1.0, 3.0, 2.0]), hot, True)
    assert fitted[:3] == pytest.approx([0.5, 1.0, 3.0], rel=0.06) and fitted[3] == 1.0


def test_an_over_confident_model_gets_at_least_half_the_ece_and_the_same_argmax():
    """The acceptance. A real small model trained to over-confidence in well under
    a second: multinomial logistic regression (a one-layer network) on 200 of
    scikit-learn's digits, almost unregularised (C = 1e4: trained to ~zero
    training loss, no smoothing). T is fitted on 400 validation images and
    judged on the other 1,197. Training an imgcls CNN that long takes minutes
    here; the README measures one (ECE 0.068 -> 0.025 on 1,000 held-out digits)."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x, y = digits.data / 16, digits.target
    order = np.random.default_rng(0).permutation(len(y))
    train, val, test = order[:200], order[200:600], order[600:]
    model = LogisticRegression(C=1e4, max_iter=3000).fit(x[train], y[train])
    z_val, z_test = (torch.tensor(model.decision_function(x[i])) for i in (val, test))
    stored, _ = C.fitted(z_val, torch.tensor(y[val]), False, "validation")
    t = stored["temperature"]
    before = C.calibration_metrics(z_test, torch.tensor(y[test]), False)
    after = C.calibration_metrics(z_test, torch.tensor(y[test]), False, t)
    assert t > 1.5  # over-confident: the logits are shrunk
    assert after["ece"] <= before["ece"] / 2, (before["ece"], after["ece"])
    assert after["nll"] < before["nll"]
    assert torch.equal(C.probabilities(z_test, False, t).argmax(1), z_test.argmax(1))


def test_thresholds_move_with_the_temperature_and_decide_the_same():
    z = torch.linspace(-6, 6, 101).unsqueeze(1).repeat(1, 2)
    old, new, thresholds = [1.0, 2.0], [3.0, 0.5], [0.3, 0.8]
    moved = C.carry_thresholds(thresholds, old, new)
    for k in range(2):
        before = torch.sigmoid(z[:, k] / old[k]) >= thresholds[k]
        after = torch.sigmoid(z[:, k] / new[k]) >= moved[k]
        assert torch.equal(before, after)
    assert C.carry_thresholds([0.0, 1.0], 1.0, 2.0) == [0.0, 1.0]


# --------------------------------------------------------------------------- metadata is input


BAD = [
    ({"temperature": -1.0}, "calibration.temperature: -1.0 is not a finite temperature in 0.001..1000"),
    ({"temperature": 0}, "calibration.temperature: 0 is not a finite temperature"),
    ({"temperature": float("nan")}, "calibration.temperature: nan is not a finite temperature"),
    ({"temperature": 1e9}, "calibration.temperature: 1000000000.0 is not a finite temperature"),
    ({"temperature": "2"}, "calibration.temperature: '2' is not a finite temperature"),
    ({"temperature": True}, "calibration.temperature: True is not a finite temperature"),
    (
        {"temperature": [1.0, 1.0, 1.0]},
        "calibration.temperature: one per class is for multi-label models only",
    ),
    ([2.0], "calibration: [2.0] is not a mapping"),
    ({"temperature": 2.0, "ece_after": -0.5}, "calibration.ece_after: -0.5 is not a finite number >= 0"),
    ({"temperature": 2.0, "fitted_on": 3}, "calibration.fitted_on: 3 is not text"),
]


def test_a_bad_stored_temperature_is_one_line_naming_the_file(tmp_path, cli, shapes_folder):
    from imgcls.checkpoint import load_checkpoint, save_checkpoint
    from imgcls.errors import CheckpointError
    from imgcls.metadata import parse_checkpoint_meta, parse_export_meta

    ckpt = load_checkpoint(save_tiny_checkpoint(tmp_path / "good.safetensors"))
    meta = {**ckpt.meta, "calibration": {"temperature": 2.0}}
    parse_checkpoint_meta(json.dumps(meta), "ok")
    for calibration, message in BAD:
        raw = json.dumps({**meta, "calibration": calibration})
        with pytest.raises(CheckpointError) as caught:
            parse_checkpoint_meta(raw, "x.safetensors")
        assert str(caught.value).startswith(f"x.safetensors: {message}")
    multi = {**meta, "task": "multilabel", "format": "imgcls-export"}
    for t, message in (
        ([1.0, 2.0], "temperature: 2 values, not one per class (3)"),
        ([1.0, -2.0, 1.0], "temperature[1]: -2.0"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(f"m.onnx: calibration.{message}")):
            parse_export_meta(json.dumps({**multi, "calibration": {"temperature": t}}), "m.onnx")
    # through the command: exit 2, one line naming the file, nothing else
    bad = tmp_path / "bad.safetensors"
    save_checkpoint(bad, ckpt.model, {**ckpt.meta, "calibration": {"temperature": -1.0}})
    r = cli("predict", str(next(shapes_folder.rglob("*.png"))), "--model", str(bad))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{bad}: {BAD[0][1]}" in lines[0], r.stderr


def test_a_checkpoint_without_calibration_predicts_at_temperature_1(tiny_checkpoint):
    from imgcls.predictor import load_predictor, predict_scores

    predictor = load_predictor(tiny_checkpoint, log=lambda m: None)
    assert predictor.temperature == 1.0 and predictor.calibration is None
    z = torch.randn(4, 3)
    assert torch.equal(predict_scores(predictor, z), z.softmax(1))


# --------------------------------------------------------------------------- a trained run


def _recipe(out: Path, **data) -> dict:
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"].update(data)
    raw["train"] = {"epochs": 2, "batch_size": 8, "optimizer": {"name": "adam", "lr": 0.01}}
    raw["train"]["out"] = str(out)
    return raw


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run (24 shapes, 6 for validation), trained once; tests that change it work on a copy."""
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    root = tmp_path_factory.mktemp("calibrated")
    return train(recipe_from_dict(_recipe(root / "runs")), out=root / "run", log=lambda m: None)


def _data_bytes(path: Path) -> bytes:
    """A safetensors file's tensor bytes: everything after its JSON header."""
    raw = path.read_bytes()
    (header,) = struct.unpack("<Q", raw[:8])
    return raw[8 + header :]


def test_train_stores_the_temperature_of_the_kept_weights_in_best_and_last(run):
    from imgcls.checkpoint import read_meta
    from imgcls.cli.render import train_closing, train_summary

    best, last = (
        read_meta(run.run_dir / name)["calibration"] for name in ("best.safetensors", "last.safetensors")
    )
    assert best == last == run.calibration
    assert 0.05 <= best["temperature"] <= 20 and best["temperature"] != 1.0
    assert best["fitted_on"] == "the run's validation split (6 images)"
    assert best["nll_after"] <= best["nll_before"]
    assert best["nll_before"] == pytest.approx(run.best["val_loss"], rel=1e-4)  # the kept weights' logits
    line = train_closing(train_summary(run)).splitlines()[1]
    assert line.startswith(f"calibration: T = {best['temperature']:.3g} fitted on the run's validation split")


def test_a_run_without_a_validation_split_says_it_is_not_calibrated(tmp_path, cli):
    from imgcls.checkpoint import read_meta
    from imgcls.cli.render import train_closing, train_summary
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    raw = _recipe(tmp_path / "runs", val_split=0)
    raw["train"]["epochs"] = 1
    result = train(recipe_from_dict(raw), out=tmp_path / "run", log=lambda m: None)
    stored = read_meta(result.run_dir / "best.safetensors")["calibration"]
    assert stored["temperature"] == 1.0 and stored["fitted_on"] is None
    assert "no validation split: not calibrated (T = 1)" in train_closing(train_summary(result))
    r = cli("calibrate", str(result.run_dir))  # nothing to fit on: say how to give data
    assert r.returncode == 2 and "no validation split" in r.stderr and "--data DIR" in r.stderr, r.stderr


def test_calibrate_refits_on_other_data_and_keeps_the_weights(run, shapes_folder, tmp_path, cli):
    from imgcls.checkpoint import read_meta

    copy_ = shutil.copytree(run.run_dir, tmp_path / "run")
    weights = {name: _data_bytes(copy_ / name) for name in ("best.safetensors", "last.safetensors")}
    r = cli("calibrate", str(copy_), "--data", str(shapes_folder), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    t = out["calibration"]["temperature"]
    assert out["previous"] == run.calibration and t != run.calibration["temperature"]
    assert out["calibration"]["fitted_on"] == f"{shapes_folder} (24 images)"
    assert out["after"]["nll"] <= out["before"]["nll"] and {"ece", "mce", "nll", "brier"} <= set(out["after"])
    for name, data in weights.items():
        assert _data_bytes(copy_ / name) == data  # the weights, byte for byte
        assert read_meta(copy_ / name)["calibration"] == out["calibration"]
    assert out["written"] == [str(copy_ / "best.safetensors"), str(copy_ / "last.safetensors")]
    # the table for people: before and after
    r = cli("calibrate", str(copy_), "--data", str(shapes_folder))
    assert r.returncode == 0 and "ECE (15 bins)" in r.stdout and "before (T = 1)" in r.stdout


def test_predict_shows_calibrated_probabilities(run, shapes_folder, tmp_path, cli):
    from imgcls.checkpoint import store_calibration

    t = run.calibration["temperature"]
    plain = shutil.copy(run.run_dir / "best.safetensors", tmp_path / "plain.safetensors")
    store_calibration([Path(plain)], C.stored(1.0, None, None))
    image = str(next(shapes_folder.rglob("*.png")))
    shown = {}
    for name, model in (("calibrated", run.run_dir), ("plain", plain)):
        r = cli("predict", image, "--model", str(model), "--json")
        assert r.returncode == 0, r.stderr
        shown[name] = {p["label"]: p["p"] for p in json.loads(r.stdout)["top_k"]}
    classes = sorted(shown["plain"])
    log_p = torch.tensor([shown["plain"][c] for c in classes], dtype=torch.float64).log()
    want = (log_p / t).softmax(0)  # softmax(logits / T): log-softmax differs from the logits by a constant
    got = torch.tensor([shown["calibrated"][c] for c in classes], dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got, log_p.exp(), atol=1e-3)


def test_evaluate_reports_calibration_before_and_after_with_a_reliability_diagram(run, tmp_path, cli):
    copy_ = shutil.copytree(run.run_dir, tmp_path / "run")
    r = cli("evaluate", str(copy_), "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    cal = report["calibration"]
    assert cal["temperature"] == run.calibration["temperature"] and cal["n_bins"] == 15
    # evaluated on the split the temperature was fitted on: the numbers train stored
    assert cal["before"]["ece"] == pytest.approx(run.calibration["ece_before"], abs=1e-5)
    assert cal["after"]["nll"] == pytest.approx(run.calibration["nll_after"], abs=1e-5)
    assert report["loss"] == pytest.approx(cal["after"]["nll"], rel=1e-5)  # what evaluate shows is calibrated
    png = Path(report["files"]["reliability_png"])
    assert png == copy_ / "eval" / "reliability.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (copy_ / "report.html").read_text()
    assert 'id="reliability"' in page and 'id="calibration"' in page and "<h2>Calibration</h2>" in page


def test_an_export_carries_the_temperature_and_still_passes_its_parity_check(
    run, shapes_folder, tmp_path, cli
):
    from imgcls.predictor import load_predictor

    out = tmp_path / "model.pt"
    r = cli("export", str(run.run_dir), "--format", "torchscript", "--out", str(out), "--json")
    assert r.returncode == 0, r.stderr
    checks = json.loads(r.stdout)["checks"]
    assert checks and all(check["ok"] for check in checks)  # the graph's output: the logits, unscaled
    exported = load_predictor(out, log=lambda m: None)
    assert exported.temperature == run.calibration["temperature"]
    image = str(next(shapes_folder.rglob("*.png")))
    probs = []
    for model in (run.run_dir, out):
        r = cli("predict", image, "--model", str(model), "--json")
        probs.append([p["p"] for p in json.loads(r.stdout)["top_k"]])
    assert probs[0] == pytest.approx(probs[1], abs=1e-5)


def test_a_multilabel_model_gets_a_temperature_per_class(tiny_checkpoint, shapes_folder, tmp_path, cli):
    from imgcls.checkpoint import load_checkpoint, read_meta, save_checkpoint
    from imgcls.predictor import load_predictor, predict_scores

    ckpt = load_checkpoint(tiny_checkpoint)
    path = tmp_path / "ml.safetensors"
    save_checkpoint(path, ckpt.model, {**ckpt.meta, "task": "multilabel", "thresholds": [0.3, 0.5, 0.7]})
    rows = [f"{p},{p.parent.name}" for p in sorted(shapes_folder.rglob("*.png"))]
    rows[0] += ";square"  # several labels in a row
    labels = tmp_path / "labels.csv"
    labels.write_text("file,labels\n" + "\n".join(rows) + "\n")
    r = cli("calibrate", str(path), "--data", str(labels), "--json")
    assert r.returncode == 0, r.stderr
    t = json.loads(r.stdout)["calibration"]["temperature"]
    assert isinstance(t, list) and len(t) == 3 and len(set(t)) > 1 and all(0.05 <= v <= 20 for v in t)
    meta = read_meta(path)
    moved = meta["thresholds"]
    assert moved == pytest.approx(C.carry_thresholds([0.3, 0.5, 0.7], 1.0, t))
    predictor = load_predictor(path, log=lambda m: None)
    z = torch.randn(8, 3)
    assert torch.equal(predict_scores(predictor, z), torch.sigmoid(z / torch.tensor(t, dtype=z.dtype)))
