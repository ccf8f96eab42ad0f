"""predict's library parts: inputs, preprocessing, the record stream."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image

from imgcls.data.inputs import load_input
from imgcls.forward import normalize
from imgcls.predict import Failure, Prediction, collect_inputs, predict_files
from imgcls.predictor import load_predictor, pretrained_preprocessing


def _tree(root: Path) -> Path:
    (root / "a" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    for name in ("a/1.png", "a/deep/2.jpg", "a/.secret.png", ".hidden/3.png", "b.png"):
        Image.new("RGB", (10, 6), (200, 10, 10)).save(root / name)
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def test_folders_recurse_and_skip_hidden_and_non_images(tmp_path):
    root = _tree(tmp_path)
    files, missing = collect_inputs([str(root)])
    assert [p.relative_to(root).as_posix() for p in files] == ["b.png", "a/1.png", "a/deep/2.jpg"]
    assert missing == []


def test_globs_stdin_missing_and_duplicates(tmp_path):
    root = _tree(tmp_path)
    files, missing = collect_inputs([str(root / "a" / "*.png"), str(root / "nope.png"), str(root / "*.gif")])
    assert files == [root / "a" / "1.png"]
    assert [m.file for m in missing] == [str(root / "nope.png"), str(root / "*.gif")]

    stdin = io.StringIO(f"{root / 'b.png'}\n\n{root / 'a'}\n{root / 'b.png'}\n")
    files, missing = collect_inputs(["-"], stdin)
    assert files == [root / "b.png", root / "a" / "1.png", root / "a" / "deep" / "2.jpg"]
    assert missing == []


def test_records_in_order_with_failures(tmp_path, tiny_checkpoint, shapes_folder):
    good = sorted((shapes_folder / "square").glob("*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(good[0].read_bytes()[:60])  # truncated
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    predictor = load_predictor(tiny_checkpoint)
    records = list(predict_files(predictor, [good[0], broken, good[1], text, good[2]], batch_size=2, top_k=5))
    assert [type(r) for r in records] == [Prediction, Failure, Prediction, Failure, Prediction]
    assert [r.file for r in records] == [str(p) for p in (good[0], broken, good[1], text, good[2])]
    first = records[0]
    assert len(first.top_k) == 3  # capped at the class count
    assert first.label == first.top_k[0][0] and first.confidence == first.top_k[0][1]
    assert sum(p for _, p in first.top_k) == pytest.approx(1.0, abs=1e-5)


def test_threshold_marks_unsure(tiny_checkpoint, shapes_folder):
    files = sorted((shapes_folder / "circle").glob("*.png"))[:2]
    predictor = load_predictor(tiny_checkpoint)
    assert all(r.unsure for r in predict_files(predictor, files, threshold=0.999))
    assert not any(r.unsure for r in predict_files(predictor, files, threshold=0.01))
    assert not any(r.unsure for r in predict_files(predictor, files))


def test_no_run_found_is_a_clear_error(tmp_path):
    from imgcls.errors import CheckpointError

    with pytest.raises(CheckpointError, match="--model"):
        load_predictor(None, runs_root=tmp_path / "runs")


def test_pretrained_preprocessing_matches_torchvision_transforms(tmp_path):
    from torchvision.models import get_model_weights

    weights = get_model_weights("mobilenet_v3_small").DEFAULT
    pre = pretrained_preprocessing(weights)
    assert pre["image_size"] == [224, 224] and pre["resize_to"] == 256
    for size in ((300, 400), (517, 261), (200, 200)):
        path = tmp_path / f"{size[0]}x{size[1]}.png"
        g = torch.Generator().manual_seed(size[0])
        pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g)
        Image.fromarray(pixels.numpy()).save(path)
        ours = normalize(load_input(path, pre)[None], pre["mean"], pre["std"])[0]
        theirs = weights.transforms()(Image.open(path).convert("RGB"))
        assert ours.shape == theirs.shape == (3, 224, 224)
        assert torch.allclose(ours, theirs, atol=1e-5)
