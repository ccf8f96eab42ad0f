"""imgcls.summary: parameter and MAC counts, folding, rendering, errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torchvision
from rich.console import Console
from torch import nn

from imgcls.errors import RecipeError, UsageError
from imgcls.models.build import build_model
from imgcls.recipe import ModelSpec
from imgcls.summary import (
    Summary,
    meta_init,
    summarize_model,
    summarize_target,
    summary_table,
    summary_text,
    totals_lines,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TORCHVISION_MODELS = torchvision.models.list_models(module=torchvision.models)
# One model per code path: the variants of a family (resnet18/34, efficientnet_b0..b7,
# regnet_x_400mf..32gf, vit_b_16..h_14...) differ in depth and width only, built from
# the same blocks, so they exercise the same counting; a family with two kinds of
# block (efficientnet v1/v2, regnet x/y, resnet basic/bottleneck/grouped, swin v1/v2,
# vgg with/without batch norm) keeps one of each. Measuring all 80 cost ~55 s CPU.
TORCHVISION_FAMILIES = {
    "alexnet": ["alexnet"],
    "convnext": ["convnext_tiny"],
    "densenet": ["densenet121"],
    "efficientnet": ["efficientnet_b0", "efficientnet_v2_s"],
    "googlenet": ["googlenet"],
    "inception": ["inception_v3"],
    "maxvit": ["maxvit_t"],
    "mnasnet": ["mnasnet0_5"],
    "mobilenetv2": ["mobilenet_v2"],
    "mobilenetv3": ["mobilenet_v3_small"],
    "regnet": ["regnet_x_400mf", "regnet_y_400mf"],
    "resnet": ["resnet18", "resnet50", "resnext50_32x4d"],
    "shufflenetv2": ["shufflenet_v2_x0_5"],
    "squeezenet": ["squeezenet1_1"],
    "swin_transformer": ["swin_t", "swin_v2_t"],
    "vgg": ["vgg11", "vgg11_bn"],
    "vision_transformer": ["vit_b_32"],
}


def _family(name: str) -> str:
    return torchvision.models.get_model_builder(name).__module__.rsplit(".", 1)[1]


def depth1(summary: Summary) -> dict[str, int]:
    return {row.name: row.params for row in summary.rows if row.depth == 1}


# --------------------------------------------------------------------------- seed numbers


def test_seed_conv448():
    s = summarize_target(str(RECIPES / "seed-conv448.yaml"))
    assert s.total_params == 448 == s.trainable_params
    assert depth1(s) == {"conv1": 448}
    assert s.rows[1].output_shape == (1, 16, 30, 30)
    assert s.num_classes is None  # head: none, no classifier
    assert s.param_bytes == 448 * 4
    # activation memory: leaf outputs x 4 bytes (fp32)
    assert s.activation_bytes == 16 * 30 * 30 * 4
    # MACs: 30x30 positions x 16 filters x 27 weights, plus one bias add each
    assert s.total_macs == 30 * 30 * 16 * 27 + 30 * 30 * 16


def test_seed_4layer_per_row():
    s = summarize_target(str(RECIPES / "seed-4layer.yaml"))
    assert s.total_params == 2_103_156
    assert depth1(s) == {"conv1": 224, "conv2": 3_216, "flatten1": 0, "dense1": 2_097_664, "dense2": 2_052}
    shapes = {row.name: row.output_shape for row in s.rows if row.depth == 1}
    assert shapes["conv1"] == (1, 8, 32, 32)
    assert shapes["conv2"] == (1, 16, 16, 16)  # same, stride 2: ceil(32 / 2)
    assert shapes["flatten1"] == (1, 4096)
    assert s.num_classes == 4


def test_vgg16():
    s = summarize_target("vgg16")
    assert s.total_params == 138_357_544
    assert s.input_shape == (3, 224, 224) and s.num_classes == 1000
    assert s.rows[0].output_shape == (1, 1000)


def test_lenet5_defaults_to_its_own_input():
    s = summarize_target("lenet5")
    assert s.input_shape == (1, 32, 32) and s.num_classes == 10
    assert s.total_params == 61_706


# --------------------------------------------------------------------------- every torchvision model


def test_every_torchvision_family_is_measured():
    """A family torchvision adds (or a model moved between families) must be listed above."""
    families = {}
    for name in TORCHVISION_MODELS:
        families.setdefault(_family(name), []).append(name)
    assert families.keys() == TORCHVISION_FAMILIES.keys()
    for family, names in TORCHVISION_FAMILIES.items():
        assert set(names) <= set(families[family]), family


@pytest.mark.parametrize("name", [n for names in TORCHVISION_FAMILIES.values() for n in names])
def test_every_torchvision_family(name):
    """Totals equal the model's own count; MACs agree with torchvision's published GFLOPS.

    Each is measured at its weights' crop size (inception_v3 299, efficientnet_b7
    600, vit_h_14 518...), where torchvision's ``_ops`` were counted. Those leave
    out bias adds, which we count (as torchinfo does): hence the 1.5 %.
    """
    weights = torchvision.models.get_model_weights(name).DEFAULT
    size = weights.transforms().crop_size[0]
    with meta_init():
        model = build_model(ModelSpec(arch=name), (3, size, size), 1000)
    s = summarize_model(model, (3, size, size))
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert s.trainable_params == s.total_params
    assert s.rows[0].params == s.total_params
    assert s.total_macs == pytest.approx(weights.meta["_ops"] * 1e9, rel=0.015)


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "googlenet", "resnet50", "densenet121", "mobilenet_v2"])
def test_macs_match_torchinfo(name):
    torchinfo = pytest.importorskip("torchinfo")
    # torchinfo counts from shapes alone, so it runs on the same meta model
    with meta_init():
        model = build_model(ModelSpec(arch=name), (3, 224, 224), 1000)
    model.to("meta").eval()
    x = torch.empty(1, 3, 224, 224, device="meta")
    expected = torchinfo.summary(model, input_data=x, device="meta", verbose=0).total_mult_adds
    assert summarize_target(name).total_macs == expected  # exactly: bias adds and norms included


def test_vit_counts_tokens_and_attention():
    """torchinfo counts a Linear once per image, not per token, and no attention products."""
    s = summarize_target("vit_b_16")
    tokens, dim, mlp = 197, 768, 3072
    per_block = (
        tokens * dim * 3 * dim  # q, k, v projections
        + 2 * tokens * tokens * dim  # q @ k^T and attn @ v
        + tokens * dim * dim  # output projection
        + 2 * tokens * dim * mlp  # the MLP
    )
    block = next(r for r in s.rows if r.name == "encoder.layers.encoder_layer_0")
    assert block.macs == pytest.approx(per_block, rel=0.01)


# --------------------------------------------------------------------------- real models, sharing


def test_summarize_model_real_weights_untouched():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    before = model.fc.weight.clone()
    s = summarize_model(model, (3, 64, 64), name="r18")
    assert s.total_params == sum(p.numel() for p in model.parameters())
    assert s.name == "r18" and s.rows[-1].output_shape == (1, 10)
    assert model.training and model.fc.weight.device.type == "cpu"
    assert torch.equal(model.fc.weight, before)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    # same numbers as the meta build
    meta = summarize_target("resnet18", (3, 64, 64), num_classes=10)
    assert (s.total_params, s.total_macs) == (meta.total_params, meta.total_macs)


def test_frozen_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    s = summarize_model(model, (3, 8, 8))
    assert s.non_trainable_params == 3 * 4 * 9 + 4
    assert [r.trainable for r in s.rows] == ["partial", "no", "yes", "--", "yes"]


def test_shared_module_counted_once():
    shared = nn.Linear(8, 8)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = shared, shared

        def forward(self, x):
            return self.b(self.a(x.flatten(1)))

    s = summarize_model(Twice(), (2, 2, 2))
    assert s.total_params == 72
    assert [r.name for r in s.rows] == ["", "a"]  # the second name is the same module
    assert s.rows[1].calls == 2
    assert s.total_macs == 2 * (64 + 8)


def test_tied_weights_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(12, 12)
            self.second = nn.Linear(12, 12)
            self.second.weight = self.first.weight  # one weight, two modules, two biases

        def forward(self, x):
            return self.second(self.first(x.flatten(1)))

    model = Tied()
    s = summarize_model(model, (3, 2, 2))
    assert s.total_params == sum(p.numel() for p in model.parameters()) == 144 + 12 + 12
    assert [r.params for r in s.rows] == [168, 156, 12]  # the weight goes to its first owner


# --------------------------------------------------------------------------- folding, dict, rendering


def test_fold_keeps_subtree_totals():
    full = summarize_target("resnet18")
    folded = full.fold(1)
    assert max(r.depth for r in folded.rows) == 1
    assert (folded.total_params, folded.total_macs) == (full.total_params, full.total_macs)
    layer1 = next(r for r in folded.rows if r.name == "layer1")
    assert layer1.folded and not layer1.children
    assert layer1.params == sum(
        p.numel() for n, p in torchvision.models.resnet18().named_parameters() if n.startswith("layer1.")
    )
    assert sum(r.params for r in folded.rows if r.depth == 1) == full.total_params
    assert sum(r.macs for r in folded.rows if r.depth == 1) == full.total_macs
    assert summarize_target("resnet18", depth=0).rows[0].params == full.total_params
    with pytest.raises(UsageError):
        full.fold(-1)


def test_to_dict_is_plain_json():
    d = summarize_target(str(RECIPES / "seed-4layer.yaml"), depth=1).to_dict()
    assert list(d) == [
        "name", "model_type", "input_shape", "num_classes", "total_params", "trainable_params",
        "non_trainable_params", "total_macs", "param_bytes", "buffer_bytes", "activation_bytes", "depth", "rows",
    ]  # fmt: skip
    assert d["total_params"] == 2_103_156 and d["input_shape"] == [3, 32, 32]
    assert list(d["rows"][1]) == [
        "name", "type", "depth", "output_shape", "params", "trainable_params", "macs", "calls", "folded",
    ]  # fmt: skip
    assert d["rows"][1]["folded"] is True and d["rows"][1]["output_shape"] == [1, 8, 32, 32]
    assert json.loads(json.dumps(d)) == d
    assert all(type(d[k]) is int for k in ("total_params", "total_macs", "param_bytes", "activation_bytes"))


def test_table_and_totals():
    s = summarize_target(str(RECIPES / "seed-4layer.yaml"))
    console = Console(width=140, file=io.StringIO(), color_system=None)
    console.print(summary_table(s))
    text = console.file.getvalue()
    assert "2,097,664" in text and "    linear (Linear)" in text and "[1, 16, 16, 16]" in text
    lines = totals_lines(s)
    assert "Total params: 2,103,156" in lines
    assert "Non-trainable params: 0" in lines
    assert "Total params: 2,103,156" in summary_text(s)


# --------------------------------------------------------------------------- targets and errors


def test_input_too_small_is_a_usage_error():
    with pytest.raises(UsageError, match=r"3x16x16"):
        summarize_target("vgg16", (3, 16, 16))
    with pytest.raises(UsageError, match="vit_b_16"):
        summarize_target("vit_b_16", (3, 225, 225))  # not a multiple of the patch size


def test_bad_shapes_and_names():
    with pytest.raises(UsageError, match="did you mean"):
        summarize_target("resnet19")
    with pytest.raises(UsageError, match="channels x height x width"):
        summarize_target("vgg16", (3, 0, 224))
    with pytest.raises(RecipeError, match="no such recipe"):
        summarize_target("missing.yaml")
    with pytest.raises(UsageError, match="folder"):
        summarize_target(str(RECIPES))


def test_overrides_and_channels(tmp_path):
    s = summarize_target("resnet18", overrides=["model.num_classes=10"])
    assert s.rows[-1].params == 512 * 10 + 10
    recipe = tmp_path / "gray.yaml"
    recipe.write_text("model: {arch: resnet18, num_classes: 3}\ndata: {channels: 1, image_size: 64}\n")
    s = summarize_target(str(recipe))
    assert s.input_shape == (1, 64, 64) and s.rows[-1].output_shape == (1, 3)
    assert s.name == "gray"


def test_meta_init_allocates_nothing():
    with meta_init():
        model = build_model(ModelSpec(arch="regnet_x_400mf"), (3, 224, 224), 1000)
    assert {p.device.type for p in model.parameters()} == {"meta"}


def test_every_layer_kind_runs_on_meta(tmp_path):
    """The whole vocabulary (asymmetric pads, avg-pool 'same', blocks) works shape-only."""
    recipe = tmp_path / "all.yaml"
    recipe.write_text(
        """
model:
  num_classes: 5
  layers:
    - conv: {filters: 8, kernel: 4, stride: 2, padding: same, batch_norm: true, activation: relu}
    - separable: {filters: 8, kernel: 3}
    - depthwise: {kernel: 3, depth_multiplier: 2}
    - avgpool: {size: 3, stride: 2, padding: same}
    - maxpool: {size: 2, padding: same}
    - residual: {layers: [conv: {filters: 24, kernel: 3, stride: 2, padding: same}], activation: relu}
    - parallel: {branches: [[conv: {filters: 4, kernel: 1}], [maxpool: {size: 3, stride: 1, padding: same}]]}
    - repeat: {times: 2, layers: [conv: {filters: 28, kernel: 1}, batchnorm, dropout: 0.1]}
    - global_max_pool
    - dense: {units: 16, activation: gelu}
"""
    )
    s = summarize_target(str(recipe), (3, 33, 33))
    from imgcls.recipe import load_recipe

    real = build_model(load_recipe(recipe).model, (3, 33, 33), 5)
    assert s.total_params == sum(p.numel() for p in real.parameters())
    with torch.no_grad():
        assert real.eval()(torch.randn(1, 3, 33, 33)).shape == s.rows[0].output_shape == (1, 5)
    assert summarize_model(real, (3, 33, 33), num_classes=5).to_dict() == {
        **s.to_dict(),
        "name": "Sequential",
    }


def test_a_checkpoint_or_run_summarizes_with_its_own_shape_and_classes(tiny_checkpoint):
    from imgcls.checkpoint import load_checkpoint

    summary = summarize_target(str(tiny_checkpoint))
    model = load_checkpoint(tiny_checkpoint).model
    assert summary.total_params == sum(p.numel() for p in model.parameters())
    assert tuple(summary.input_shape) == (3, 16, 16) and summary.num_classes == 3
