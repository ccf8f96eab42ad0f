"""The layer vocabulary and the zoo, as a recipe author sees them through build_model."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

from imgcls.errors import ShapeError, UsageError
from imgcls.models.build import build_model
from imgcls.recipe import recipe_from_dict


def build(layers, shape=(3, 8, 8), classes=None, head="none", **model):
    """Build a layer list (YAML form) the way ``imgcls train`` does."""
    recipe = recipe_from_dict({"model": {"layers": layers, "head": head, **model}})
    return build_model(recipe.model, shape, classes)


def run(model, shape, fill=None):
    """A real forward pass on the CPU: its shape must be the one the builder predicted."""
    x = torch.randn(2, *shape) if fill is None else torch.full((2, *shape), float(fill))
    with torch.no_grad():
        y = model.eval()(x)
    assert tuple(y.shape[1:]) == tuple(model.output_shape)
    return y


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("size", [7, 8, 9])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("kernel", [1, 2, 3, 4, 5])
def test_same_padding_keeps_ceil_size_over_stride(size, stride, kernel):
    model = build(
        [{"conv": {"filters": 4, "kernel": kernel, "stride": stride, "padding": "same"}}], (3, size, size)
    )
    out = math.ceil(size / stride)
    assert model.output_shape == (4, out, out)
    run(model, (3, size, size))


def test_same_padding_non_square():
    model = build(
        [{"conv": {"filters": 2, "kernel": [3, 4], "stride": [2, 3], "padding": "same"}}], (1, 9, 10)
    )
    assert model.output_shape == (2, 5, 4)
    run(model, (1, 9, 10))


@pytest.mark.parametrize("kernel", [2, 3, 5])
def test_full_and_valid_padding(kernel):
    full = build([{"conv": {"filters": 2, "kernel": kernel, "padding": "full"}}], (3, 8, 8))
    assert full.output_shape == (2, 8 + kernel - 1, 8 + kernel - 1)  # pads kernel - 1 each side
    run(full, (3, 8, 8))
    valid = build([{"conv": {"filters": 2, "kernel": kernel}}], (3, 8, 8))  # valid is the default
    assert valid.output_shape == (2, 8 - kernel + 1, 8 - kernel + 1)
    run(valid, (3, 8, 8))


def test_int_padding_and_dilation():
    padded = build([{"conv": {"filters": 2, "kernel": 3, "padding": 2}}], (3, 8, 8))
    assert padded.output_shape == (2, 10, 10)
    run(padded, (3, 8, 8))
    dilated = build([{"conv": {"filters": 2, "kernel": 3, "dilation": 2}}], (3, 9, 9))
    assert dilated.output_shape == (2, 5, 5)  # a 3x3 window dilated by 2 spans 5
    run(dilated, (3, 9, 9))
    same = build([{"conv": {"filters": 2, "kernel": 3, "dilation": 2, "padding": "same"}}], (3, 9, 9))
    assert same.output_shape == (2, 9, 9)
    run(same, (3, 9, 9))


# --------------------------------------------------------------------------- conv kinds


def test_groups():
    model = build([{"conv": {"filters": 8, "kernel": 3, "groups": 2}}], (4, 8, 8))
    assert n_params(model) == 8 * (4 // 2) * 9 + 8
    run(model, (4, 8, 8))
    with pytest.raises(ShapeError, match="groups=3"):
        build([{"conv": {"filters": 8, "groups": 3}}], (4, 8, 8))


def test_separable_and_depthwise_params():
    sep = build([{"separable": {"filters": 16, "kernel": 3}}], (4, 8, 8))
    # depthwise 3x3 per channel (no bias), then 1x1 to 16 filters with bias
    assert n_params(sep) == 4 * 9 + 4 * 16 + 16
    assert sep.output_shape == (16, 8, 8)  # separable defaults to same
    run(sep, (4, 8, 8))
    sep2 = build([{"separable": {"filters": 16, "kernel": 3, "depth_multiplier": 2}}], (4, 8, 8))
    assert n_params(sep2) == 8 * 9 + 8 * 16 + 16
    dw = build([{"depthwise": {"kernel": 3, "depth_multiplier": 2, "stride": 2}}], (4, 8, 8))
    assert n_params(dw) == 8 * 9 + 8
    assert dw.output_shape == (8, 4, 4)
    run(dw, (4, 8, 8))


def test_batch_norm_drops_the_conv_bias():
    model = build(
        [{"conv": {"filters": 4, "kernel": 3, "batch_norm": True, "activation": "relu"}}], (3, 8, 8)
    )
    assert n_params(model) == 4 * 27 + 2 * 4
    run(model, (3, 8, 8))


# --------------------------------------------------------------------------- pooling


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("pool", [2, 3])
def test_pools_with_same_padding(size, pool):
    shape = (2, size, size)
    out = math.ceil(size / pool)
    avg = build([{"avgpool": {"size": pool, "padding": "same"}}], shape)
    assert avg.output_shape == (2, out, out)
    # padded cells are not counted: the average of ones stays one everywhere
    assert torch.allclose(run(avg, shape, fill=1.0), torch.ones(1))
    mx = build([{"maxpool": {"size": pool, "padding": "same"}}], shape)
    assert mx.output_shape == (2, out, out)
    # nor do they win a max: padding is -inf, not 0
    assert torch.equal(run(mx, shape, fill=-5.0), torch.full((2, 2, out, out), -5.0))


def test_pool_stride_defaults_to_size_and_global_pools():
    model = build([{"maxpool": 2}, {"avgpool": {"size": 3, "stride": 1}}], (3, 8, 8))
    assert model.output_shape == (3, 2, 2)
    run(model, (3, 8, 8))
    for kind in ("global_avg_pool", "global_max_pool"):
        model = build([{"conv": 5}, kind], (3, 8, 8))
        assert model.output_shape == (5,)
        run(model, (3, 8, 8))


# --------------------------------------------------------------------------- dense, errors


def test_dense_after_flatten_infers_its_input():
    model = build([{"conv": {"filters": 4, "kernel": 3}}, "flatten", {"dense": 10}], (3, 8, 8))
    assert model.output_shape == (10,)
    assert n_params(model.dense1) == 4 * 6 * 6 * 10 + 10
    run(model, (3, 8, 8))


def test_impossible_stack_names_the_layer_and_shapes():
    with pytest.raises(ShapeError) as err:
        build([{"maxpool": 2}, {"maxpool": 2}, {"conv": {"filters": 4, "kernel": 5}}], (3, 12, 12))
    message = str(err.value)
    assert "model.layers[2]" in message and "5x5" in message and "3x3" in message
    assert "padding: same" in message  # the fix


def test_dense_on_a_feature_map_says_how_to_fix_it():
    with pytest.raises(ShapeError, match=r"model.layers\[1\].*4x6x6.*flatten"):
        build([{"conv": 4}, {"dense": 10}], (3, 8, 8))
    with pytest.raises(ShapeError, match=r"model.layers\[2\].*before 'flatten'"):
        build(["flatten", {"dense": 10}, {"conv": 4}], (3, 8, 8))


# --------------------------------------------------------------------------- blocks


def test_residual_identity_and_projection():
    body = [{"conv": {"filters": 4, "kernel": 3, "padding": "same", "bias": False}}]
    same = build([{"residual": {"layers": body}}], (4, 8, 8))
    assert n_params(same) == 4 * 4 * 9  # identity shortcut: no parameters
    assert isinstance(same.residual1.shortcut, nn.Identity)
    run(same, (4, 8, 8))
    wider = build([{"residual": {"layers": body, "activation": "relu"}}], (3, 8, 8))
    # 3 -> 4 channels: a 1x1 projection (no bias) and its BatchNorm on the shortcut
    assert n_params(wider.residual1.shortcut) == 3 * 4 + 2 * 4
    run(wider, (3, 8, 8))
    always = build([{"residual": {"layers": body, "projection": "always"}}], (4, 8, 8))
    assert n_params(always.residual1.shortcut) == 4 * 4 + 2 * 4


def test_residual_with_stride_2():
    body = [{"conv": {"filters": 8, "kernel": 3, "stride": 2, "padding": "same"}}]
    for size in (8, 7):
        model = build([{"residual": {"layers": body}}], (4, size, size))
        assert model.output_shape == (8, math.ceil(size / 2), math.ceil(size / 2))
        assert model.residual1.shortcut.conv.stride == (2, 2)
        run(model, (4, size, size))


def test_parallel_concatenates_channels():
    branches = [
        [{"conv": {"filters": 4, "kernel": 1}}],
        [{"conv": {"filters": 6, "kernel": 3, "padding": "same"}}],
        [{"maxpool": {"size": 3, "stride": 1, "padding": "same"}}],
    ]
    model = build([{"parallel": {"branches": branches}}], (3, 8, 8))
    assert model.output_shape == (4 + 6 + 3, 8, 8)
    run(model, (3, 8, 8))
    with pytest.raises(ShapeError, match=r"model.layers\[0\].*4x8x8, 6x6x6"):
        build([{"parallel": {"branches": [branches[0], [{"conv": {"filters": 6, "kernel": 3}}]]}}], (3, 8, 8))


def test_repeat():
    model = build([{"repeat": {"times": 3, "layers": [{"conv": {"filters": 4, "kernel": 3}}]}}], (4, 10, 10))
    assert model.output_shape == (4, 4, 4)
    assert n_params(model) == 3 * (4 * 4 * 9 + 4)  # three copies, not one shared
    run(model, (4, 10, 10))


# --------------------------------------------------------------------------- heads, tags


def test_softmax_at_the_end_is_dropped():
    model = build(
        ["flatten", {"dense": {"units": 5, "activation": "softmax"}}], (3, 4, 4), classes=5, head="auto"
    )
    assert not any(isinstance(m, nn.Softmax) for m in model.modules())
    model = build(["flatten", {"dense": 5}, "softmax"], (3, 4, 4), classes=5, head="auto")
    assert not any(isinstance(m, nn.Softmax) for m in model.modules())
    y = run(model, (3, 4, 4))
    assert not torch.allclose(y.sum(1), torch.ones(2))  # logits, not probabilities


def test_auto_head():
    model = build([{"conv": 8}, "global_avg_pool"], (3, 8, 8), classes=4, head="auto")
    assert isinstance(model.head, nn.Linear) and model.head.in_features == 8
    assert model.output_shape == (4,)
    run(model, (3, 8, 8))
    ends_in_classes = build(["flatten", {"dense": 4}], (3, 8, 8), classes=4, head="auto")
    assert not hasattr(ends_in_classes, "head")
    with pytest.raises(ShapeError, match="global_avg_pool"):
        build([{"conv": 8}], (3, 8, 8), classes=4, head="auto")


def test_l1_l2_tags():
    model = build(
        [{"conv": {"filters": 4, "l2": 0.01}}, "flatten", {"dense": 3}],
        (3, 8, 8),
        l1=0.001,
    )
    conv, dense = model.conv1, model.dense1
    assert conv.imgcls_regularization == (0.001, 0.01)  # layer l2, global l1
    assert dense.imgcls_regularization == (0.001, 0.0)
    untagged = build(["flatten", {"dense": 3}], (3, 8, 8))
    assert not hasattr(untagged.dense1, "imgcls_regularization")


# --------------------------------------------------------------------------- named architectures


def test_arch_with_one_channel_replaces_the_first_conv():
    recipe = recipe_from_dict({"model": {"arch": "resnet18"}})
    model = build_model(recipe.model, (1, 32, 32), 7)
    assert model.conv1.in_channels == 1
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_lenet5():
    recipe = recipe_from_dict({"model": {"arch": "lenet5"}})
    model = build_model(recipe.model, (1, 32, 32), 10)
    assert n_params(model) == 61_706
    run(model, (1, 32, 32))


def test_unknown_arch_suggests_a_name():
    recipe = recipe_from_dict({"model": {"arch": "resnt50"}})
    with pytest.raises(UsageError, match="did you mean resnet50"):
        build_model(recipe.model, (3, 224, 224), 10)


def test_timm_without_timm_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    recipe = recipe_from_dict({"model": {"arch": "timm/resnet18"}})
    with pytest.raises(UsageError, match=r"pip install 'imgcls\[timm\]'"):
        build_model(recipe.model, (3, 224, 224), 10)
