"""int8 exports (`imgcls export --quantize int8`): the accuracy gate, its
refusals, and the int8 file run by predict like any other export."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_CNN
from PIL import Image

from imgcls.data.shapes import draw_shape

pytest.importorskip("onnxruntime")

KINDS = ["circle", "square", "triangle"]
CELL = 8


def write_cells(root: Path, per_class: int, seed: int = 0) -> Path:
    """Class k: a shape of kind k in cell k of a 2x2 grid, noise elsewhere
    (a tiny network learns it in a few epochs). A folder of class folders."""
    rng = np.random.default_rng(seed)
    for k, kind in enumerate(KINDS):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            canvas = rng.integers(0, 60, (2 * CELL, 2 * CELL, 3), dtype=np.uint8)
            r, c = divmod(k, 2)
            canvas[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL] = draw_shape(kind, CELL, rng)
            Image.fromarray(canvas).save(root / kind / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A single-label and a multi-label run, trained once (in this process)."""
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    root = tmp_path_factory.mktemp("quantize")
    data = write_cells(root / "cells", 30)
    single = {
        "name": "cells",
        "data": {"source": "folder", "path": str(data), "image_size": 2 * CELL, "val_split": 0.3},
        "model": {"layers": copy.deepcopy(SMALL_CNN)},
        "train": {"epochs": 4, "batch_size": 16, "optimizer": {"lr": 0.003}},
    }
    with pytest.MonkeyPatch.context() as mp:  # the curves and report.html are not what is tested here
        mp.setattr("imgcls.training.loop._plot", lambda *a: None)
        mp.setattr("imgcls.report.write_report", lambda *a: None)
        one = train(recipe_from_dict(single), out=root / "single", log=lambda message: None)
    return {"single": one.run_dir, "multi": _as_multilabel(one.run_dir, root), "data": data, "root": root}


def _as_multilabel(run: Path, root: Path) -> Path:
    """The trained model relabelled as a multi-label one (sigmoid per class),
    its recipe's data a CSV of the same images where every third image has a
    second label: a multi-label run without a second training."""
    from imgcls.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run)
    rows = ["file,labels"]
    for k, kind in enumerate(KINDS):
        for i, png in enumerate(sorted((root / "cells" / kind).glob("*.png"))):
            extra = f";{KINDS[(k + 1) % len(KINDS)]}" if i % 3 == 0 else ""
            rows.append(f"{png},{kind}{extra}")
    (root / "ml.csv").write_text("\n".join(rows) + "\n")
    recipe = copy.deepcopy(ckpt.meta["recipe"])
    recipe["data"].update(source="csv", path=str(root / "ml.csv"))
    out = root / "multi" / "best.safetensors"
    out.parent.mkdir()
    save_checkpoint(out, ckpt.model, {**ckpt.meta, "recipe": recipe, "task": "multilabel"})
    return out


def _val_images(run: Path) -> list[Path]:
    from imgcls.checkpoint import load_checkpoint
    from imgcls.data.sources import open_source

    ckpt = load_checkpoint(run)
    return [p for p, _ in open_source(ckpt.recipe.data, ckpt.run_dir or ckpt.path.parent).val]


def _predict(cli, model: Path, images: list[Path], *extra: str) -> list[dict]:
    r = cli("predict", "--model", str(model), *map(str, images), "--json", *extra)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_int8_export_passes_the_gate_and_predicts_like_fp32(runs, cli):
    run = runs["single"]
    r = cli("export", str(run), "--format", "onnx", "--quantize", "int8", "--calibrate", "40", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    int8 = run / "model.int8.onnx"
    assert result["path"] == str(int8) and int8.is_file()
    q = result["quantization"]
    gate = q["gate"]
    assert q["calibration_images"] == 40 and q["ops"] == ["Conv", "Gemm", "MatMul"]
    assert gate["split"] == "val" and gate["images"] == len(_val_images(run)) and gate["passed"]
    assert gate["fp32"] >= 0.8 and gate["drop"] <= 1.0 and gate["agreement"] >= 0.9
    assert gate["drop"] == pytest.approx((gate["fp32"] - gate["int8"]) * 100)
    # the file: QDQ nodes, and the fp32 export's metadata plus the quantization facts
    import onnx

    proto = onnx.load(str(int8))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["imgcls"])
    assert meta["classes"] == KINDS and meta["quantization"] == q
    # predict runs it like any other export, and decides like the float32 model on most images
    images = _val_images(run)
    got = _predict(cli, int8, images)
    ref = _predict(cli, run, images)
    same = sum(a["label"] == b["label"] for a, b in zip(got, ref, strict=True))
    assert same >= 0.9 * len(images)
    assert all(abs(a["confidence"] - b["confidence"]) < 0.2 for a, b in zip(got, ref, strict=True))
    # TTA on the int8 file (int8 x tta)
    tta = _predict(cli, int8, images[:4], "--tta")
    assert [t["file"] for t in tta] == [str(p) for p in images[:4]]


def _with_outlier_channel(run: Path, out: Path) -> Path:
    """The run's checkpoint with one feature channel of its last conv made a
    constant 1e4 that the head ignores: float32 decides as before (minus that
    channel), but int8's per-tensor activation scale now steps by ~40, so
    every other channel rounds to 0 (the outlier-channel failure of int8)."""
    import torch

    from imgcls.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(run)
    model = ckpt.model
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    conv = convs[-1]
    per = head.in_features // conv.out_channels
    with torch.no_grad():
        j = int(head.weight.view(head.out_features, conv.out_channels, per).norm(dim=(0, 2)).argmin())
        conv.weight[j] = 0
        conv.bias[j] = 1e4
        head.weight.view(head.out_features, conv.out_channels, per)[:, j] = 0
    save_checkpoint(out, model, ckpt.meta)
    return out


def test_the_gate_refuses_a_big_drop_and_force_keeps_it(runs, cli):
    ckpt = _with_outlier_channel(runs["single"], runs["single"] / "outlier.safetensors")
    out = runs["root"] / "deploy" / "outlier.int8.onnx"
    out.parent.mkdir()
    args = ("export", str(ckpt), "--out", str(out), "--quantize", "int8", "--calibrate", "30")
    r = cli(*args, "--max-drop", "5")
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "int8 gate on" in line and "fp32 ->" in line and "over --max-drop 5" in line
    assert "nothing was written" in line and "Traceback" not in r.stderr
    assert list(out.parent.iterdir()) == []  # no file, no temporary left behind
    r = cli(*args, "--max-drop", "5", "--force", "--json")
    assert r.returncode == 0, r.stderr
    gate = json.loads(r.stdout)["quantization"]["gate"]
    assert out.is_file() and not gate["passed"] and gate["forced"] and gate["drop"] > 5
    assert "warning:" in r.stderr and "kept because of --force" in r.stderr
    assert len(_predict(cli, out, _val_images(runs["single"])[:3])) == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (("--format", "torchscript", "--quantize", "int8"), "--quantize int8 applies to --format onnx only"),
        (("--format", "onnx", "--calibrate", "10"), "--calibrate applies to --quantize int8 only"),
        (("--format", "onnx", "--max-drop", "1"), "--max-drop applies to --quantize int8 only"),
        (("--format", "onnx", "--quantize", "int8", "--calibrate", "0"), "--calibrate 0: give at least 1"),
        (("--format", "onnx", "--quantize", "int8", "--max-drop", "-1"), "--max-drop -1.0: give the"),
        (("--format", "onnx", "--quantize", "int4"), "unknown --quantize 'int4'; choose int8"),
    ],
)
def test_bad_combinations_are_refused_in_one_line(tiny_checkpoint, cli, tmp_path, args, message):
    r = cli("export", str(tiny_checkpoint), "--out", str(tmp_path / "m.onnx"), *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_multilabel_gate_uses_exact_match_and_predict_keeps_the_label_sets(runs, cli):
    ckpt = runs["multi"]
    out = ckpt.parent / "ml.int8.onnx"
    r = cli("export", str(ckpt), "--out", str(out), "--quantize", "int8", "--calibrate", "30", "--json")
    assert r.returncode == 0, r.stderr
    gate = json.loads(r.stdout)["quantization"]["gate"]
    assert gate["metric"] == "exact-match" and gate["agreement"] >= 0.8
    # exact-match: the ratio evaluate reports as accuracy (the float32 model, the same split)
    from imgcls.evaluate import evaluate

    report = evaluate(ckpt, log=lambda m: None, out=runs["root"] / "ml-eval").report
    assert report["task"] == "multilabel" and report["samples"] == gate["images"]
    assert gate["fp32"] == pytest.approx(report["exact_match"], abs=1e-6)
    got = _predict(cli, out, _val_images(ckpt)[:6])
    assert all("labels" in rec and "label" not in rec for rec in got)  # label sets, as the checkpoint


def test_a_run_whose_images_are_gone_is_refused_before_the_export(tiny_checkpoint, cli, tmp_path):
    from imgcls.checkpoint import load_checkpoint, save_checkpoint

    ckpt = load_checkpoint(tiny_checkpoint)
    recipe = copy.deepcopy(ckpt.meta["recipe"])
    recipe["data"].update(source="folder", path=str(tmp_path / "gone"))
    save_checkpoint(tmp_path / "moved.safetensors", ckpt.model, {**ckpt.meta, "recipe": recipe})
    r = cli("export", str(tmp_path / "moved.safetensors"), "--format", "onnx", "--quantize", "int8")
    assert r.returncode == 2, r.stderr
    assert "int8 export needs the run's images" in r.stderr and str(tmp_path / "gone") in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved.safetensors"]
