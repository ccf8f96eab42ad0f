"""recipes/architectures/: each recipe IS its reference implementation.

For each architecture, against torchvision's or timm's model:

* on the meta device, at the recipe's full input size: the same total
  parameters and MACs (the summarize engine), and every weight layer (conv,
  linear, norm) with the same output shape, in the same order;
* the reference's parameters and buffers copied into the recipe-built model
  in registration order (shapes matching one to one) give the same outputs on
  a random image (fp32, CPU, eval mode; a smaller image where the network
  allows, to keep the file fast).

Both models are built once, on the meta device; the real tensors are
allocated only for the output check.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from imgcls.models.build import build_model
from imgcls.recipe import load_recipe
from imgcls.summary import _measure, summarize_model

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

# name: (library, reference name, constructor kwargs, input for the output check)
REFERENCES = {
    "alexnet": ("torchvision", "alexnet", {}, (3, 64, 64)),
    "vgg16": ("torchvision", "vgg16", {}, (3, 32, 32)),
    "googlenet": ("torchvision", "googlenet", {"aux_logits": False, "init_weights": False}, (3, 32, 32)),
    "resnet18": ("torchvision", "resnet18", {}, (3, 32, 32)),
    "resnet50": ("torchvision", "resnet50", {}, (3, 32, 32)),
    "resnext50_32x4d": ("torchvision", "resnext50_32x4d", {}, (3, 32, 32)),
    "wide_resnet50_2": ("torchvision", "wide_resnet50_2", {}, (3, 32, 32)),
    "densenet121": ("torchvision", "densenet121", {}, (3, 32, 32)),
    "mobilenet_v2": ("torchvision", "mobilenet_v2", {}, (3, 32, 32)),
    "mobilenet_v3_small": ("torchvision", "mobilenet_v3_small", {}, (3, 32, 32)),
    "shufflenet_v2_x1_0": ("torchvision", "shufflenet_v2_x1_0", {}, (3, 32, 32)),
    "seresnet50": ("timm", "seresnet50", {}, (3, 32, 32)),
    "xception": ("timm", "legacy_xception", {}, (3, 32, 32)),
    "inception_resnet_v2": ("timm", "inception_resnet_v2", {}, (3, 75, 75)),
}


def _reference(library: str, name: str, kwargs: dict) -> nn.Module:
    with torch.device("meta"):
        if library == "torchvision":
            import torchvision

            return torchvision.models.get_model(name, weights=None, **kwargs)
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, **kwargs)


def _weight_layers(model: nn.Module, summary) -> list[tuple[tuple, int]]:
    """(output shape, parameters) of every module with parameters of its own
    (conv, linear, norm), in registration order."""
    own = {name: sum(p.numel() for p in m.parameters(recurse=False)) for name, m in model.named_modules()}
    return [(row.output_shape, own[row.name]) for row in summary.rows if own[row.name]]


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Weights ~ U(+-sqrt(3 / fan_in)) (unit variance out for unit variance in);
    norms and running statistics away from 1 and 0, so that a wrong eps, a
    missing norm or a swapped tensor shows in the outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                bound = math.sqrt(3 / p[0].numel())
                p.uniform_(-bound, bound, generator=gen)
            elif name.endswith("bias"):
                p.normal_(0, 0.1, generator=gen)
            else:
                p.uniform_(0.5, 1.5, generator=gen)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.normal_(0, 0.1, generator=gen)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=gen)
            else:
                b.zero_()


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_recipe_is_the_reference(name):
    library, ref_name, kwargs, small = REFERENCES[name]
    recipe = load_recipe(RECIPES / "architectures" / f"{name}.yaml")
    shape = recipe.input_shape()
    reference = _reference(library, ref_name, kwargs)
    with torch.device("meta"):
        ours = build_model(recipe.model, shape, 1000)

    # counts and shapes, on the meta device at the full input size (the
    # engine itself: summarize_model would first copy these meta models)
    theirs_s = _measure(reference, shape, ref_name, None)
    ours_s = _measure(ours, shape, name, None)
    assert ours_s.total_params == theirs_s.total_params
    assert ours_s.total_macs == theirs_s.total_macs
    assert _weight_layers(ours, ours_s) == _weight_layers(reference, theirs_s)

    # the same tensors, one to one in registration order
    pairs = list(zip(reference.state_dict().items(), ours.state_dict().items(), strict=True))
    for (their_key, theirs), (our_key, mine) in pairs:
        assert theirs.shape == mine.shape, f"{their_key} {tuple(theirs.shape)} vs {our_key} {tuple(mine.shape)}"

    # the same outputs, with the reference's (random) weights and statistics;
    # assign=True: the recipe-built model takes the reference's tensors (no copy)
    reference.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    _randomize(reference, gen)
    ours.load_state_dict(dict(zip(ours.state_dict(), reference.state_dict().values(), strict=True)), assign=True)
    x = torch.randn((1, *small), generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is faster, on a busy machine much faster
    try:
        with torch.no_grad():
            expected = reference.eval()(x)
            got = ours.eval()(x)
    finally:
        torch.set_num_threads(threads)
    assert expected.std() > 1e-3  # the check means something: not a constant output
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), (got - expected).abs().max()


def _build(layers: list, shape=(8, 8, 8)) -> nn.Module:
    from imgcls.models.build import build_layers
    from imgcls.recipe import recipe_from_dict

    spec = recipe_from_dict({"model": {"layers": layers}}).model
    return build_layers(spec.layers, shape, None, head="none")


def test_dense_block_is_the_concat_long_form():
    block = _build([{"dense_block": {"layers": 2, "growth": 4, "bottleneck": 2}}])
    body = ["batchnorm", "relu", {"conv": {"filters": 8, "kernel": 1, "bias": False}}]
    body += ["batchnorm", "relu", {"conv": {"filters": 4, "kernel": 3, "padding": 1, "bias": False}}]
    long = _build([{"repeat": {"times": 2, "layers": [{"parallel": {"branches": [[], body]}}]}}])
    _randomize(block, torch.Generator().manual_seed(0))
    long.load_state_dict(dict(zip(long.state_dict(), block.state_dict().values(), strict=True)))
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        assert block.eval()(x).shape == (2, 16, 8, 8)
        assert torch.equal(block(x), long.eval()(x))


def test_new_layers_summarize_exactly():
    """se, split, add, channel_shuffle, scale, adaptive pool: shapes, params and MACs by hand."""
    model = _build(
        [
            {"se": {"reduction": 4}},  # 8 -> 2 -> 8: (8*2+2) + (2*8+8) = 42 params and MACs
            {"split": {"branches": [[], [{"conv": {"filters": 4, "kernel": 1}}]]}},  # 4*4+4 = 20
            {"channel_shuffle": 2},
            {"add": {"branches": [[], [{"conv": {"filters": 8, "kernel": 1, "bias": False}}]]}},  # 64
            {"scale": 0.5},
            {"adaptive_avg_pool": 2},
        ]
    )
    s = summarize_model(model, (8, 8, 8))
    assert s.rows[0].output_shape == (1, 8, 2, 2)
    assert s.total_params == 42 + 20 + 64
    assert s.total_macs == 42 + 20 * 64 + 64 * 64


@pytest.mark.parametrize(
    "layer, message",
    [
        ({"split": {"branches": [[], [], []]}}, "3 branches need input channels (8) divisible by 3"),
        ({"channel_shuffle": 3}, "groups=3 must divide the input channels (8)"),
        (
            {"add": {"branches": [[], [{"conv": {"filters": 4, "kernel": 1}}]]}},
            "branches must give the same shape to be added; they give 8x8x8, 4x8x8",
        ),
    ],
)
def test_new_layers_name_the_problem(layer, message):
    from imgcls.errors import ShapeError

    with pytest.raises(ShapeError, match=r"model\.layers\[0\] \(\w+\): " + re.escape(message)):
        _build([layer])


def test_every_architecture_recipe_is_checked():
    assert sorted(p.stem for p in (RECIPES / "architectures").glob("*.yaml")) == sorted(REFERENCES)


@pytest.mark.parametrize(
    "path",
    sorted((RECIPES / "architectures").glob("*.yaml")) + sorted((RECIPES / "lecture").glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_recipes_round_trip(path):
    """What a run folder and a checkpoint store (the resolved recipe) reads back the same."""
    from imgcls.recipe import recipe_from_dict, recipe_to_dict

    recipe = load_recipe(path)
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe
