"""Test-time augmentation: the logits of the image and of its mirror, averaged."""

from __future__ import annotations

import json

import torch

from imgcls.forward import logits, tta_logits


def test_tta_is_the_mean_of_plain_and_flipped_logits():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5)).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = (logits(model, x) + logits(model, x.flip(-1))) / 2
    assert torch.allclose(tta_logits(model, x), expected)
    # a mirror-symmetric image: TTA changes nothing
    sym = torch.cat([x[..., :4], x[..., :4].flip(-1)], dim=-1)
    assert torch.allclose(tta_logits(model, sym), logits(model, sym), atol=1e-6)
    assert not torch.allclose(tta_logits(model, x), logits(model, x))


def test_evaluate_and_predict_report_tta_beside_plain(tiny_checkpoint, shapes_folder, tmp_path):
    from imgcls.evaluate import evaluate, report_renderables
    from imgcls.predict import predict_files
    from imgcls.predictor import load_predictor

    result = evaluate(tiny_checkpoint, shapes_folder, out=tmp_path / "e", tta=True, log=lambda m: None)
    plain, tta = result.report, result.report["tta"]
    assert set(tta) == {"accuracy", "balanced_accuracy", "top_k_accuracy", "loss", "macro_f1"}
    assert tta["loss"] != plain["loss"]  # the flipped view changed the logits
    written = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert written["tta"] == tta
    assert report_renderables(result)[0].columns[2].header == "with TTA (flip)"

    predictor = load_predictor(tiny_checkpoint, log=lambda m: None)
    files = sorted(shapes_folder.rglob("*.png"))[:3]
    flipped = list(predict_files(predictor, files, tta=True))
    plain_p = list(predict_files(predictor, files))
    assert [r.confidence for r in flipped] != [r.confidence for r in plain_p]
