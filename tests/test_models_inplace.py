"""Branching blocks compute what the README says, whatever layer comes first.

``residual`` hands one tensor to the body and the shortcut, ``parallel`` to
every branch, ``repeat`` to its first copy: no layer may change it in place.
Each model is checked against a copy of itself with every in-place op
switched off (same weights): the same outputs, the same gradients, and the
caller's input left as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch

from imgcls.models.build import build_model
from imgcls.recipe import recipe_from_dict

ACTIVATIONS = ["relu", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh", "softmax"]
C = 4  # channels everywhere, so a residual needs no projection


def shape_keeping_layers(act: str) -> dict[str, dict | str]:
    """Every kind of layer that keeps a CxHxW map, each ending in ``act`` where it can."""
    return {
        "activation": {"activation": {"name": act}},
        "conv": {"conv": {"filters": C, "kernel": 3, "padding": "same", "activation": act}},
        "conv_bn": {"conv": {"filters": C, "kernel": 1, "batch_norm": True, "activation": act}},
        "depthwise": {"depthwise": {"kernel": 3, "activation": act}},
        "separable": {"separable": {"filters": C, "kernel": 3, "padding": "same", "activation": act}},
        "maxpool": {"maxpool": {"size": 3, "stride": 1, "padding": "same"}},
        "avgpool": {"avgpool": {"size": 3, "stride": 1, "padding": "same"}},
        "batchnorm": "batchnorm",
        "dropout": {"dropout": 0.3},
    }


def blocks(first: dict | str, act: str) -> dict[str, dict]:
    """``first`` at the start, in the middle and at the end of each branching block."""
    conv = {"conv": {"filters": C, "kernel": 3, "padding": "same"}}
    return {
        "residual-first": {"residual": {"layers": [first, conv]}},
        "residual-middle": {"residual": {"layers": [conv, first, conv]}},
        "residual-last": {"residual": {"layers": [conv, first], "activation": act}},
        "parallel-first-branch": {"parallel": {"branches": [[first], [conv]]}},
        "parallel-later-branch": {"parallel": {"branches": [[conv], [first], [first, conv]]}},
        "repeat-in-residual": {"residual": {"layers": [{"repeat": {"times": 2, "layers": [first, conv]}}]}},
        "parallel-in-residual": {
            "residual": {
                "layers": [
                    {"parallel": {"branches": [[first], [conv]]}},
                    {"conv": {"filters": C, "kernel": 1}},
                ]
            }
        },
    }


def build(layers: list, shape=(3, 6, 6)):
    recipe = recipe_from_dict({"model": {"layers": layers, "head": "none"}})
    return build_model(recipe.model, shape, None)


def without_inplace(model: torch.nn.Module) -> torch.nn.Module:
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return reference


def forward_and_grads(model: torch.nn.Module, x: torch.Tensor, train: bool):
    model.train(train)
    x = x.clone().requires_grad_(True)
    seen = x.detach().clone()
    torch.manual_seed(0)  # dropout draws the same mask in both models
    out = model(x)
    assert torch.equal(x.detach(), seen), "the model changed its input in place"
    # a weighted sum, so every output element has its own gradient
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return out.detach(), x.grad.clone(), grads


def assert_same(model: torch.nn.Module, x: torch.Tensor) -> None:
    reference = without_inplace(model)
    for train in (True, False):
        out, gx, grads = forward_and_grads(model, x, train)
        ref_out, ref_gx, ref_grads = forward_and_grads(reference, x, train)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
        for g, ref in zip(grads, ref_grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)
        model.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Hundreds of tiny forward/backward passes: one thread is ~30x faster
    than two fighting over a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_every_position(kinds: list[str], act: str) -> None:
    torch.manual_seed(0)
    # the stem conv has no activation: the block's input is a tensor nobody may overwrite
    stem = {"conv": {"filters": C, "kernel": 3, "padding": "same"}}
    x = torch.randn(2, 3, 6, 6)
    for kind in kinds:
        first = shape_keeping_layers(act)[kind]
        for where, block in blocks(first, act).items():
            model = build([stem, block, "global_avg_pool"])
            try:
                assert_same(model, x)
            except AssertionError as exc:
                raise AssertionError(f"{kind} in {where} ({act}): {exc}") from None


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation_in_every_position_matches_an_out_of_place_reference(act):
    check_every_position(["activation", "conv"], act)


def test_every_layer_kind_in_every_position_matches_an_out_of_place_reference():
    check_every_position(list(shape_keeping_layers("relu")), "relu")


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "elu", "silu"])
def test_flat_blocks_and_the_model_input_are_left_alone(act):
    torch.manual_seed(0)
    first = {"activation": {"name": act}}
    dense = {"dense": {"units": 12, "activation": act}}
    layers = [
        first,  # straight on the caller's batch
        "flatten",
        first,  # on a view of it
        {"residual": {"layers": [first, dense, {"dense": 12}], "activation": act}},
        {"residual": {"layers": ["dropout", first, {"dense": 12}]}},
        {"repeat": {"times": 2, "layers": [first, {"dense": 12}]}},
    ]
    model = build(layers, shape=(3, 2, 2))
    x = torch.randn(3, 3, 2, 2)
    assert_same(model, x)


def test_pre_activation_residual_adds_x_not_relu_x():
    """The README's example in numbers: relu(x) never reaches the shortcut."""
    model = build([{"residual": {"layers": ["relu", {"conv": {"filters": 3, "kernel": 1}}]}}], (3, 2, 2))
    block = model[0]
    x = torch.randn(1, 3, 2, 2)
    with torch.no_grad():
        expected = block.body[1](torch.relu(x)) + x
        got = model(x.clone())
    torch.testing.assert_close(got, expected)
