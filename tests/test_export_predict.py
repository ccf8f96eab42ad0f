"""`imgcls predict` on an exported model answers as it does on the checkpoint.

Acceptance: for every test image, predict on model.onnx / model.pt gives the
same top-1 label as predict on the checkpoint it came from (confidences
within the export check's probability tolerance); and predict on an ONNX
file never builds the torch model.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from conftest import TINY_RECIPE, invoke_cli

CONFIDENCE_ATOL = 1e-4  # export.Tolerance.prob_atol: the decimals a person reads


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run folder of TINY_RECIPE trained 3 epochs: its predictions vary per image."""
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    spec = copy.deepcopy(TINY_RECIPE)
    spec["train"]["epochs"] = 3
    result = train(recipe_from_dict(spec), out=tmp_path_factory.mktemp("run") / "tiny", log=lambda m: None)
    assert (result.run_dir / "best.safetensors").is_file()
    return result.run_dir


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory) -> dict[str, Path]:
    """model.onnx and model.pt of the trained run, written by `imgcls export`."""
    folder = tmp_path_factory.mktemp("exports")
    out = {}
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.pt")):
        path = folder / name
        result = invoke_cli("export", str(trained_run), "--format", fmt, "--out", str(path), "-q")
        assert result.returncode == 0, result.stderr
        out[fmt] = path
    return out


def predict_json(model: Path, folder: Path) -> dict[str, dict]:
    """`imgcls predict --model MODEL --json FOLDER`, as {file: record}."""
    result = invoke_cli("predict", "--model", str(model), "--json", str(folder))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return {r["file"]: r for r in records}


@pytest.fixture(scope="module")
def checkpoint_predictions(trained_run, shapes_folder) -> dict[str, dict]:
    preds = predict_json(trained_run / "best.safetensors", shapes_folder)
    assert len(preds) == 24  # 3 classes x 8 images
    labels = {r["label"] for r in preds.values()}
    assert len(labels) >= 2, "the model answers the same for every image: the comparison would be vacuous"
    return preds


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_predict_on_export_matches_checkpoint(fmt, exports, checkpoint_predictions, shapes_folder):
    got = predict_json(exports[fmt], shapes_folder)
    assert got.keys() == checkpoint_predictions.keys()
    for file, want in checkpoint_predictions.items():
        have = got[file]
        assert have["label"] == want["label"], file
        assert have["confidence"] == pytest.approx(want["confidence"], abs=CONFIDENCE_ATOL), file
        assert [k["label"] for k in have["top_k"]] == [k["label"] for k in want["top_k"]], file


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_predict_on_export_never_builds_the_torch_model(
    fmt, exports, checkpoint_predictions, shapes_folder, monkeypatch
):
    """In-process: building a model or reading a checkpoint would raise."""
    import imgcls.checkpoint
    import imgcls.models.build
    from imgcls.predict import Failure, predict

    def forbidden(*args, **kwargs):
        raise AssertionError("predict on an exported model built the torch model")

    monkeypatch.setattr(imgcls.models.build, "build_model", forbidden)
    monkeypatch.setattr(imgcls.checkpoint, "load_checkpoint", forbidden)
    predictor, records = predict([str(shapes_folder)], model=exports[fmt], log=lambda m: None)
    records = list(records)
    assert not [r for r in records if isinstance(r, Failure)]
    assert {r.file: r.label for r in records} == {f: r["label"] for f, r in checkpoint_predictions.items()}
    assert predictor.source == str(exports[fmt])


def test_predict_on_onnx_imports_no_model_code(exports, shapes_folder):
    """A fresh process predicting with model.onnx never imports the model builder or torchvision."""
    code = (
        "import sys\n"
        "from imgcls.cli import app\n"
        "try:\n"
        f"    app(['predict', '--model', {str(exports['onnx'])!r}, '--json', {str(shapes_folder)!r}],"
        " standalone_mode=False)\n"
        "finally:\n"
        "    names = ('imgcls.models.build', 'imgcls.models.zoo', 'imgcls.checkpoint', 'torchvision')\n"
        "    print('LOADED', [m for m in names if m in sys.modules], file=sys.stderr)\n"
    )
    import subprocess

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 24
    assert "LOADED []" in result.stderr, result.stderr
