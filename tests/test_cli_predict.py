"""`imgcls predict` end to end: formats, inputs, failures, models."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def photos(tmp_path_factory, shapes_folder) -> Path:
    """A folder of good images (nested) for predict."""
    import shutil

    root = tmp_path_factory.mktemp("photos")
    shutil.copytree(shapes_folder / "circle", root / "circles")
    shutil.copytree(shapes_folder / "square", root / "more" / "squares")
    return root


def test_table(cli, tiny_checkpoint, photos):
    r = cli("predict", str(photos / "circles"), "--model", str(tiny_checkpoint), "--top-k", "2")
    assert r.returncode == 0, r.stderr
    assert "label" in r.stdout and "circle_0000" in r.stdout
    assert sum(name in r.stdout for name in ("circle", "square", "triangle")) >= 2


def test_json_lines_with_a_quoted_glob(cli, tiny_checkpoint, photos):
    r = cli(
        "predict", str(photos / "**" / "*.png"), "--model", str(tiny_checkpoint), "--json", "--top-k", "9"
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(records) == 16  # recursive: circles + more/squares
    for rec in records:
        assert set(rec) == {"file", "label", "confidence", "top_k", "unsure"}
        assert len(rec["top_k"]) == 3 and rec["top_k"][0] == {"label": rec["label"], "p": rec["confidence"]}


def test_csv_from_stdin_with_threshold(cli, tiny_checkpoint, photos):
    names = sorted(str(p) for p in (photos / "more").rglob("*.png"))[:4]
    r = cli(
        "predict",
        "-",
        "--model",
        str(tiny_checkpoint),
        "--csv",
        "--threshold",
        "0.99",
        input="\n".join(names) + "\n",
    )
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["file"] for row in rows] == names
    assert list(rows[0]) == [
        "file",
        "label",
        "confidence",
        "unsure",
        "label_2",
        "p_2",
        "label_3",
        "p_3",
        "error",
    ]
    assert all(row["unsure"] == "true" for row in rows)  # an untrained model is never 99% sure


def test_partial_failure_exit_3(cli, tiny_checkpoint, photos, tmp_path):
    good = sorted((photos / "circles").glob("*.png"))[:2]
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good[0].read_bytes()[:50])
    not_image = tmp_path / "notes.png"
    not_image.write_text("just text")
    missing = tmp_path / "missing.jpg"
    args = [str(good[0]), str(truncated), str(not_image), str(missing), str(good[1])]
    r = cli("predict", *args, "--model", str(tiny_checkpoint), "--json")
    assert r.returncode == 3
    records = [json.loads(line) for line in r.stdout.splitlines()]
    errors = {rec["file"]: rec["error"] for rec in records if "error" in rec}
    assert set(errors) == {str(truncated), str(not_image), str(missing)}
    assert {rec["file"] for rec in records if "label" in rec} == {str(good[0]), str(good[1])}
    for name in (truncated, not_image, missing):
        assert any(str(name) in line for line in r.stderr.splitlines())
    assert "Traceback" not in r.stderr


def test_every_file_failed_exit_2(cli, tiny_checkpoint, tmp_path):
    """Nothing predicted is not a partial failure: exit 2, still one error line/record per file."""
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    not_image = tmp_path / "notes.png"
    not_image.write_text("just text")
    missing = tmp_path / "missing.jpg"
    args = [str(truncated), str(not_image), str(missing)]
    r = cli("predict", *args, "--model", str(tiny_checkpoint), "--json")
    assert r.returncode == 2, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert {rec["file"] for rec in records if "error" in rec} == set(args) and len(records) == 3
    for name in args:
        assert any(name in line for line in r.stderr.splitlines())
    assert "none of the 3 files could be read" in r.stderr
    assert "partial" not in r.stderr and "the others were predicted" not in r.stderr
    assert "Traceback" not in r.stderr


def test_no_inputs_exit_2(cli, tiny_checkpoint, tmp_path):
    r = cli("predict", str(tmp_path / "nothing-here.png"), "--model", str(tiny_checkpoint))
    assert r.returncode == 2 and "no input files" in r.stderr


def test_no_model_found_exit_2(cli, photos, tmp_path):
    r = cli("predict", str(photos / "circles"), cwd=tmp_path)
    assert r.returncode == 2
    assert "--model" in r.stderr and "Traceback" not in r.stderr


def test_latest_run_is_used_and_named(cli, tiny_checkpoint, photos, tmp_path):
    import shutil

    run = tmp_path / "runs" / "tiny" / "1"
    run.mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run / "best.safetensors")
    r = cli("predict", str(photos / "circles" / "circle_0000.png"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.path.join("runs", "tiny", "1", "best.safetensors") in r.stderr
    assert json.loads(r.stdout)["label"] in ("circle", "square", "triangle")


def test_pretrained_offline_from_the_hub_cache(cli, photos, tmp_path):
    """--arch --pretrained reads $TORCH_HOME/hub/checkpoints/<file> as torchvision would."""
    import torch
    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights("mobilenet_v3_small").DEFAULT
    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(get_model("mobilenet_v3_small").state_dict(), cache / os.path.basename(weights.url))
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "no_proxy": "",
        "https_proxy": "http://127.0.0.1:9",
        "http_proxy": "http://127.0.0.1:9",
    }
    image = photos / "circles" / "circle_0000.png"
    r = cli(
        "predict", str(image), "--arch", "mobilenet_v3_small", "--pretrained", "--json", "-k", "5", env=env
    )
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)  # stdout holds results only
    categories = weights.meta["categories"]
    assert rec["label"] in categories and len(rec["top_k"]) == 5
    assert "downloading" not in r.stderr.lower()


def test_arch_without_pretrained_is_refused(cli, photos):
    r = cli("predict", str(photos / "circles"), "--arch", "resnet18")
    assert r.returncode == 2 and "--pretrained" in r.stderr


def test_predict_in_a_fresh_process_imports_no_training_code(tiny_checkpoint, photos):
    """`imgcls predict --model RUN photo.png`, a real process: inference never
    loads the training stack (training/, tune, the decode cache and pool, augment)."""
    import subprocess
    import sys

    photo = next((photos / "circles").iterdir())
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('MODULES', ' '.join(sorted(sys.modules)), file=sys.stderr))\n"
        f"sys.argv = ['imgcls', 'predict', '--model', {str(tiny_checkpoint)!r}, {str(photo)!r}, '--json']\n"
        "import runpy\n"
        "runpy.run_module('imgcls', run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["file"] == str(photo)
    loaded = result.stderr.rsplit("MODULES ", 1)[1].split()
    training = (
        "imgcls.training",
        "imgcls.tune",
        "imgcls.data.cache",
        "imgcls.data.batch_decode",
        "imgcls.data.augment",
    )
    assert "imgcls.predictor" in loaded and "torch" in loaded  # it did predict
    assert [m for m in loaded if m.startswith(training)] == []
