"""The one loader of published weights, and the one inference path's file helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from imgcls.errors import CheckpointError


class _Payload:
    """Unpickling this creates a file: proof that code in the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def poisoned_hub(tmp_path, monkeypatch):
    """A torch hub cache whose resnet18 weights file is a pickle carrying code."""
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    cached = tmp_path / "hub" / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    torch.save({"fc.weight": _Payload(marker)}, cached)
    return cached, marker


@pytest.mark.parametrize("how", ["predict --arch --pretrained", "model: {arch, pretrained: true}"])
def test_published_weights_are_never_unpickled(poisoned_hub, how):
    from imgcls.models.zoo import build_torchvision
    from imgcls.predictor import load_predictor

    cached, marker = poisoned_hub
    with pytest.raises(CheckpointError) as info:
        if how.startswith("predict"):
            load_predictor(arch="resnet18", pretrained=True, log=lambda m: None)
        else:
            build_torchvision("resnet18", (3, 64, 64), 5, pretrained=True)
    text = str(info.value)
    assert not marker.exists()
    assert "refused" in text and str(cached) in text
    assert "weights_only" not in text and "\n" not in text


def test_offline_without_the_file_says_where_it_was_looked_for(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.models._api as api

    from imgcls.models.zoo import load_published

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(api, "load_state_dict_from_url", offline)
    with pytest.raises(
        CheckpointError, match=r"without network, put the file at .*hub/checkpoints/resnet18-"
    ):
        load_published("resnet18")


def test_unknown_published_architecture(tmp_path):
    from imgcls.errors import UsageError
    from imgcls.models.zoo import load_published

    with pytest.raises(UsageError, match="not a torchvision architecture with published weights"):
        load_published("lenet5")


def test_predictor_forward_is_the_model_and_logits_apply_main_logits(tiny_checkpoint, shapes_folder):
    from imgcls.checkpoint import load_checkpoint
    from imgcls.data.inputs import decoded_batches
    from imgcls.forward import logits, model_input
    from imgcls.predictor import load_predictor

    predictor = load_predictor(tiny_checkpoint)
    files = sorted((shapes_folder / "square").glob("*.png"))[:3]
    (batch,) = list(decoded_batches(files, predictor.preprocessing, batch_size=8))
    pre = predictor.preprocessing
    x = model_input(torch.stack(batch), pre["mean"], pre["std"])
    net = load_checkpoint(tiny_checkpoint).model
    with torch.no_grad():
        assert torch.equal(logits(predictor.forward, x), net(x))
