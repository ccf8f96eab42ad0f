"""evaluate() with a model whose predictions are known: the dominant colour channel."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import imgcls.evaluate as ev
from imgcls.checkpoint import Checkpoint
from imgcls.errors import DataError, PartialFailure

CLASSES = ["red", "green", "blue"]
COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
# class folder -> colours of its images; predictions follow the colour, so the
# confusion matrix is [[4,0,0],[1,2,0],[0,2,1]] (as in test_metrics.py)
LAYOUT = {
    "red": ["red"] * 4,
    "green": ["red", "green", "green"],
    "blue": ["green", "green", "blue"],
}


class DominantChannel(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) * 4


def _write(folder: Path, layout: dict[str, list[str]]) -> Path:
    for cls, colours in layout.items():
        (folder / cls).mkdir(parents=True, exist_ok=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (8, 8), COLOURS[colour]).save(folder / cls / f"{i}.png")
    return folder


@pytest.fixture
def colour_ckpt(tmp_path, monkeypatch) -> Checkpoint:
    meta = {
        "classes": CLASSES,
        "preprocessing": {
            "image_size": [8, 8],
            "channels": 3,
            "mean": [0, 0, 0],
            "std": [1, 1, 1],
            "resize": "stretch",
        },
    }
    ckpt = Checkpoint(tmp_path / "colour.safetensors", meta, DominantChannel())
    monkeypatch.setattr(ev, "load_checkpoint", lambda target: ckpt)
    return ckpt


def test_numbers_known_by_construction(tmp_path, colour_ckpt):
    data = _write(tmp_path / "data", LAYOUT)
    wrong_csv = tmp_path / "wrong.csv"
    result = ev.evaluate("x", data, misclassified=wrong_csv, log=lambda m: None)
    r = result.report
    assert r["confusion"] == [[4, 0, 0], [1, 2, 0], [0, 2, 1]]
    assert r["accuracy"] == pytest.approx(0.7)
    assert r["macro"]["precision"] == pytest.approx((0.8 + 0.5 + 1.0) / 3)
    assert r["weighted"]["recall"] == pytest.approx(0.7)
    assert r["confused_pairs"][0]["true"] == "blue" and r["confused_pairs"][0]["predicted"] == "green"

    png = tmp_path / "colour-eval" / "confusion.png"
    assert result.out_dir == tmp_path / "colour-eval"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "colour-eval" / "metrics.json").read_text())
    assert saved["accuracy"] == pytest.approx(0.7)

    rows = list(csv.DictReader(wrong_csv.open()))
    assert len(rows) == 3
    assert {(Path(r["file"]).parent.name, r["true"], r["predicted"]) for r in rows} == {
        ("green", "green", "red"),
        ("blue", "blue", "green"),
    }
    assert all(0 < float(r["confidence"]) <= 1 for r in rows)


def test_subset_of_classes_maps_by_name(tmp_path, colour_ckpt):
    data = _write(tmp_path / "data", {"blue": ["blue", "blue"], "green": ["green"]})
    r = ev.evaluate("x", data, out=tmp_path / "out", log=lambda m: None).report
    assert r["accuracy"] == 1.0
    assert [row["support"] for row in r["per_class"]] == [0, 1, 2]
    assert r["macro"]["f1"] == 1.0
    assert (tmp_path / "out" / "confusion.png").is_file()


def test_unknown_class_is_an_error_naming_it(tmp_path, colour_ckpt):
    data = _write(tmp_path / "data", {"red": ["red"], "green": ["green"]})
    (data / "purple").mkdir()
    Image.new("RGB", (8, 8)).save(data / "purple" / "0.png")
    with pytest.raises(DataError, match="'purple'"):
        ev.evaluate("x", data, log=lambda m: None)


def test_test_subfolder_csv_and_bad_files(tmp_path, colour_ckpt):
    root = tmp_path / "data"
    _write(root / "train", {"red": ["red"], "green": ["green"]})
    _write(root / "test", {"red": ["red", "red"], "green": ["green"]})
    (root / "test" / "red" / "broken.png").write_bytes(b"not a png")
    logs: list[str] = []
    result = ev.evaluate("x", root, log=logs.append)
    assert result.report["samples"] == 3
    assert len(result.bad) == 1 and any("broken.png" in m for m in logs)
    assert result.to_dict()["skipped"] == 1

    table = tmp_path / "labels.csv"
    table.write_text("file,label\ndata/test/red/0.png,red\ndata/test/green/0.png,green\n")
    r = ev.evaluate("x", table, log=lambda m: None).report
    assert r["samples"] == 2 and r["accuracy"] == 1.0


def test_skipped_images_are_a_partial_failure(tmp_path, colour_ckpt):
    data = _write(tmp_path / "data", {"red": ["red"], "green": ["green"]})
    result = ev.evaluate("x", data, log=lambda m: None)
    result.raise_if_skipped()  # nothing skipped: no error
    (data / "red" / "broken.png").write_bytes(b"not a png")
    result = ev.evaluate("x", data, log=lambda m: None)  # the report still comes back
    assert result.report["samples"] == 2 and len(result.bad) == 1
    with pytest.raises(PartialFailure, match="1 of 3 images could not be read"):
        result.raise_if_skipped()


def test_csv_shares_the_source_reader(tmp_path, colour_ckpt):
    """Header names, split column, CSV-line errors: the same rules as a csv data source."""
    _write(tmp_path / "img", {"red": ["red"], "green": ["green"]})
    table = tmp_path / "labels.csv"
    table.write_text(
        "# colours\nfilename,species,split\nimg/red/0.png,red,test\nimg/green/0.png,green,\n"
        "img/green/gone.png,green,train\n"
    )
    result = ev.evaluate("x", table, log=lambda m: None)  # every row, whatever its split
    assert result.report["samples"] == 2 and result.report["accuracy"] == 1.0
    assert [p.name for p, _ in result.bad] == ["gone.png"]  # missing: skipped and counted
    table.write_text("file,label\nimg/red/0.png,red\nimg/green/0.png,green,train,extra\n")
    with pytest.raises(DataError, match=r"labels\.csv:3: expected 'file,label'"):
        ev.evaluate("x", table, log=lambda m: None)
    table.write_text("file,label\nimg/red/0.png,red,holdout\n")
    with pytest.raises(DataError, match=r"labels\.csv:2: split 'holdout' is not"):
        ev.evaluate("x", table, log=lambda m: None)
    table.write_text("file,label\n")
    with pytest.raises(DataError, match=r"labels\.csv: no rows"):
        ev.evaluate("x", table, log=lambda m: None)


def test_default_split_of_a_run(tiny_checkpoint):
    # the tiny recipe is built-in shapes: its val split is regenerated from the recipe
    result = ev.evaluate(tiny_checkpoint, log=lambda m: None)
    assert "val split" in result.data
    assert result.report["samples"] == 6  # 20% of 8 per class, rounded, x 3 classes


def test_a_folder_with_one_of_the_models_classes_is_evaluated(tmp_path, tiny_checkpoint, shapes_folder):
    """A subset of the model's classes is fine, down to one class (and an empty class folder is skipped)."""
    import shutil

    from imgcls.evaluate import evaluate

    data = tmp_path / "only-squares"
    shutil.copytree(shapes_folder / "square", data / "square")
    (data / "circle").mkdir()  # empty: nothing to evaluate for it
    result = evaluate(tiny_checkpoint, data, out=tmp_path / "eval", log=lambda m: None)
    assert result.report["samples"] == len(list((shapes_folder / "square").iterdir()))
