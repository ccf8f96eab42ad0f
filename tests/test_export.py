"""export: ONNX / TorchScript / safetensors files that match PyTorch, or no file at all."""

from __future__ import annotations

import functools
import json
import sys
import warnings
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from imgcls import export as ex
from imgcls.errors import CheckpointError, ImgclsError, UsageError
from imgcls.export import writers

PRE = {"channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3], "resize": "center_crop"}

RESIDUAL_PARALLEL = [
    {"conv": {"filters": 8, "kernel": 3, "padding": "same", "batch_norm": True, "activation": "relu"}},
    {
        "residual": {
            "layers": [
                {
                    "conv": {
                        "filters": 8,
                        "kernel": 3,
                        "padding": "same",
                        "batch_norm": True,
                        "activation": "relu",
                    }
                }
            ],
            "activation": "relu",
        }
    },
    {
        "parallel": {
            "branches": [
                [{"conv": {"filters": 4, "kernel": 1, "padding": "same", "activation": "relu"}}],
                [
                    {
                        "conv": {
                            "filters": 4,
                            "kernel": 3,
                            "padding": "same",
                            "batch_norm": True,
                            "activation": "relu",
                        }
                    }
                ],
                [{"maxpool": {"size": 3, "stride": 1, "padding": "same"}}],
            ]
        }
    },
    {"maxpool": 2},
    {
        "residual": {
            "layers": [{"conv": {"filters": 12, "kernel": 3, "padding": "same"}}],
            "activation": "relu",
        }
    },
    # the lecture's vocabulary, exported like the rest (ONNX and TorchScript parity)
    {"se": {"reduction": 4}},
    {"split": {"branches": [[], [{"conv": {"filters": 6, "kernel": 1, "activation": "relu6"}}]]}},
    {"channel_shuffle": 2},
    {"dense_block": {"layers": 2, "growth": 4, "bottleneck": 2}},
    {
        "add": {
            "branches": [
                [{"conv": {"filters": 16, "kernel": 1}}],
                [{"conv": {"filters": 16, "kernel": 3, "padding": "same", "activation": "hardswish"}}, {"scale": 0.2}],
            ]
        }
    },
    "global_avg_pool",
    {"dropout": 0.5},
]


def make_checkpoint(folder: Path, model: dict, size: int, classes: int = 4, name: str = "model") -> Path:
    """A checkpoint whose outputs depend on the input, as a trained one's do.

    Untrained nets often answer the same for every image (activations shrink
    to zero), which would make any parity check pass; so batchnorm statistics
    are calibrated on noise first, as a few training steps would set them.
    """
    from imgcls.checkpoint import save_checkpoint
    from imgcls.models.build import build_model
    from imgcls.recipe import recipe_from_dict, recipe_to_dict

    recipe = recipe_from_dict(
        {"name": name, "data": {"source": "shapes", "image_size": size}, "model": model}
    )
    torch.manual_seed(0)
    net = build_model(recipe.model, recipe.input_shape(), classes)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.momentum = None  # a plain average over the calibration batches
    net.train()
    with torch.no_grad():
        for _ in range(2 if norms else 0):
            net(torch.randn(4, 3, size, size))
    net.eval()
    path = folder / f"{name}.safetensors"
    meta = {
        "recipe": recipe_to_dict(recipe),
        "classes": [f"class{i}" for i in range(classes)],
        "input_shape": [3, size, size],
        "preprocessing": {"image_size": [size, size], **PRE},
        "epoch": 0,
    }
    save_checkpoint(path, net, meta)
    return path


@pytest.fixture(scope="module")
def residual_checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("res"), {"layers": RESIDUAL_PARALLEL}, 16, name="respar")


@functools.cache
def torch_model(ckpt_path: Path):
    """The checkpoint's PyTorch model, built once (building googlenet alone takes seconds)."""
    from imgcls.checkpoint import load_checkpoint

    return load_checkpoint(ckpt_path).model


def assert_matches(exported_path: Path, ckpt_path: Path, size: int, batches=(1, 5)) -> None:
    """The export, reloaded, gives PyTorch's logits on fresh inputs at each batch size."""
    model, net = ex.load_exported(exported_path), torch_model(ckpt_path)
    gen = torch.Generator().manual_seed(1)
    for n in batches:
        x = torch.randn(n, 3, size, size, generator=gen)
        with torch.no_grad():
            ref = net(x)
        got = model(x)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, rtol=1e-3, atol=1e-4)
        assert (got.argmax(1) == ref.argmax(1)).all()
    if batches[-1] > 1:
        assert float(ref.std(0).max()) > 1e-4, "outputs do not depend on the input: the check is vacuous"


def no_leftovers(folder: Path, keep: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == keep


# --------------------------------------------------------------------------- formats


def test_layer_stack_onnx_with_metadata(tiny_checkpoint, tmp_path):
    import onnx

    out = tmp_path / "tiny.onnx"
    result = ex.export_model(tiny_checkpoint, "onnx", out)
    assert result.path == out and out.is_file()
    assert [c.batch_size for c in result.checks] == [1, 3] and all(c.ok for c in result.checks)
    assert result.exporter == "torch.onnx (dynamo)" and result.opset >= 17
    proto = onnx.load(str(out))
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["imgcls"])
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert meta["preprocessing"] == {
        "image_size": [16, 16], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "resize": "stretch",
    }  # fmt: skip
    assert meta["input_shape"] == [3, 16, 16] and meta["batch_size"] is None
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 16, 16]
    model = ex.load_exported(out)
    assert model.kind == "onnx" and model.classes == meta["classes"] and model.path == out
    assert_matches(out, tiny_checkpoint, 16)


def test_layer_stack_torchscript_with_metadata(tiny_checkpoint, tmp_path):
    out = tmp_path / "tiny.pt"
    result = ex.export_model(tiny_checkpoint, "torchscript", out)
    assert result.exporter == "torch.jit.trace" and all(c.ok for c in result.checks)
    files = {"imgcls.json": ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is marked deprecated
        torch.jit.load(str(out), _extra_files=files)
    meta = json.loads(files["imgcls.json"])
    assert (
        meta["classes"] == ["circle", "square", "triangle"] and meta["preprocessing"]["resize"] == "stretch"
    )
    model = ex.load_exported(out)
    assert model.kind == "torchscript" and model.preprocessing["mean"] == [0.5] * 3
    assert_matches(out, tiny_checkpoint, 16)


@pytest.mark.parametrize("fmt, suffix", [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_residual_and_parallel_blocks(residual_checkpoint, tmp_path, fmt, suffix):
    out = tmp_path / f"m{suffix}"
    ex.export_model(residual_checkpoint, fmt, out)
    assert ex.load_exported(out).classes == [f"class{i}" for i in range(4)]
    assert_matches(out, residual_checkpoint, 16)


# googlenet's namedtuple output is covered by test_main_logits_of_a_namedtuple_model;
# exporting it for real cost 14 s of the suite's budget. mobilenet_v3_small (a static
# batch, 8.6 s) went for the same reason: the static-batch ONNX path is
# test_static_batch_onnx's and test_cli_export's; resnet18 takes the dynamic one.
ZOO = [("resnet18", 64, True)]


@pytest.mark.slow
@pytest.mark.parametrize("arch, size, dynamic_onnx", ZOO, ids=[a for a, _, _ in ZOO])
def test_zoo_architectures(arch, size, dynamic_onnx, tmp_path):
    ckpt = make_checkpoint(tmp_path, {"arch": arch}, size, classes=3, name=arch)
    for fmt, suffix, dynamic in (("onnx", ".onnx", dynamic_onnx), ("torchscript", ".pt", True)):
        out = tmp_path / f"{arch}{suffix}"
        result = ex.export_model(ckpt, fmt, out, dynamic_batch=dynamic, batch_size=1 if dynamic else 3)
        assert all(c.ok for c in result.checks)
        assert ex.load_exported(out).input_shape == (3, size, size)
        assert_matches(out, ckpt, size, batches=(1, 3) if dynamic else (3,))


def test_safetensors_copies_weights_and_metadata(tiny_checkpoint, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from imgcls.checkpoint import load_checkpoint

    out = tmp_path / "w.safetensors"
    ex.export_model(tiny_checkpoint, "safetensors", out)
    ours, theirs = load_file(str(out)), load_file(str(tiny_checkpoint))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()["imgcls.export"])
    assert meta["classes"] == ["circle", "square", "triangle"]
    assert load_checkpoint(out).classes == meta["classes"]  # still an imgcls checkpoint
    assert_matches(out, tiny_checkpoint, 16)


def test_main_logits_of_a_namedtuple_model(tmp_path):
    """googlenet / inception with aux heads return a namedtuple: only the logits are exported."""
    Out = namedtuple("Out", ["logits", "aux_logits"])

    class TwoHeads(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 3)

        def forward(self, x):
            h = self.conv(x).mean((2, 3))
            return Out(self.fc(h), h)

    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(4, 3, 8, 8)
    meta = {
        "format": ex.EXPORT_FORMAT,
        "version": 1,
        "classes": ["a", "b", "c"],
        "preprocessing": {**PRE, "image_size": [8, 8]},
        "input_shape": [3, 8, 8],
    }
    ref = model(x).logits.detach()
    for fmt, suffix in (("torchscript", ".pt"), ("onnx", ".onnx")):
        path = tmp_path / f"two{suffix}"
        write = ex.write_torchscript if fmt == "torchscript" else ex.write_onnx
        write(model, path, meta, x, *([None] if fmt == "onnx" else []), True, 1)
        got = ex.load_exported(path)(x)
        assert got.shape == (4, 3) and torch.allclose(got, ref, atol=1e-5)


def test_static_batch_onnx(tiny_checkpoint, tmp_path):
    import onnx

    out = tmp_path / "s.onnx"
    result = ex.export_model(tiny_checkpoint, "onnx", out, dynamic_batch=False, batch_size=2)
    assert [c.batch_size for c in result.checks] == [2] and result.batch_size == 2
    dims = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 2
    model = ex.load_exported(out)
    assert model.batch_size == 2
    assert_matches(out, tiny_checkpoint, 16, batches=(1, 5))  # padded to whole batches inside


# --------------------------------------------------------------------------- failures


def test_outputs_beyond_tolerance_leave_no_file(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setattr(writers, "TOLERANCE", ex.Tolerance(logit_rtol=-1, logit_atol=-1, prob_atol=-1))
    with pytest.raises(ImgclsError, match="does not match PyTorch.*nothing was written"):
        ex.export_model(tiny_checkpoint, "onnx", tmp_path / "m.onnx")
    no_leftovers(tmp_path, set())


def test_a_perturbed_export_fails_and_keeps_the_old_file(tiny_checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "m.pt"
    out.write_text("the user's file")
    real = ex.load_exported

    def perturbed(path, kind=None):
        model = real(path, kind)
        runner = model.runner
        model.runner = lambda x: runner(x) + 0.01  # what a wrong padding or BN mode looks like, small
        return model

    monkeypatch.setattr(writers, "load_exported", perturbed)
    with pytest.raises(ImgclsError, match="logits differ"):
        ex.export_model(tiny_checkpoint, "torchscript", out, force=True)
    assert out.read_text() == "the user's file"
    no_leftovers(tmp_path, {"m.pt"})


def test_existing_file_needs_force(tiny_checkpoint, tmp_path):
    out = tmp_path / "m.pt"
    out.write_text("keep me")
    with pytest.raises(UsageError, match="already exists; pass --force"):
        ex.export_model(tiny_checkpoint, "torchscript", out)
    assert out.read_text() == "keep me"
    ex.export_model(tiny_checkpoint, "torchscript", out, force=True)
    assert ex.load_exported(out).classes == ["circle", "square", "triangle"]


def test_missing_onnx_extra(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(UsageError) as info:
        ex.export_model(tiny_checkpoint, "onnx", tmp_path / "m.onnx")
    assert str(info.value) == "ONNX export needs onnx and onnxruntime: pip install 'imgcls[onnx]'"
    (tmp_path / "x.onnx").write_bytes(b"")
    with pytest.raises(UsageError, match=r"imgcls\[onnx\]"):
        ex.load_exported(tmp_path / "x.onnx")
    no_leftovers(tmp_path, {"x.onnx"})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"fmt": "tflite"}, "unknown export format"),
        ({"fmt": None}, "give --format"),
        ({"fmt": "onnx", "out": "m.pt"}, "must end in .onnx"),
        ({"fmt": "torchscript", "opset": 17}, "--opset applies to --format onnx only"),
    ],
)
def test_bad_usage(tiny_checkpoint, tmp_path, kwargs, message):
    if "out" in kwargs:
        kwargs["out"] = tmp_path / kwargs["out"]
    with pytest.raises(UsageError, match=message):
        ex.export_model(tiny_checkpoint, **kwargs)


def test_onnx_without_imgcls_metadata_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(CheckpointError, match="no imgcls metadata"):
        ex.load_exported(path)


# --------------------------------------------------------------------------- check images, names, tolerance


def test_check_images_from_given_folder(tiny_checkpoint, shapes_folder):
    from imgcls.checkpoint import load_checkpoint

    x, counts = ex.check_batch(load_checkpoint(tiny_checkpoint), [shapes_folder])
    assert counts == {"given": ex.MAX_CHECK_IMAGES, "data": 0, "noise": ex.NOISE_IMAGES}
    assert x.shape == (ex.MAX_CHECK_IMAGES + ex.NOISE_IMAGES, 3, 16, 16)
    # normalised with the checkpoint's mean/std: (0..1 - 0.5) / 0.25
    assert float(x.min()) >= -2.0 and float(x.max()) <= 2.0 and float(x.std()) > 0.1


def test_default_out_in_a_run_folder(tiny_checkpoint, tmp_path):
    run = tmp_path / "runs" / "tiny" / "1"
    run.mkdir(parents=True)
    (run / "best.safetensors").write_bytes(tiny_checkpoint.read_bytes())
    (run / "recipe.yaml").write_text("name: tiny\n")
    result = ex.export_model(run, "torchscript")
    assert result.path == run / "model.pt"
    assert ex.default_out(tmp_path / "a.safetensors", "onnx", in_run=False) == tmp_path / "a.onnx"
    assert (
        ex.default_out(tmp_path / "a.safetensors", "safetensors", False) == tmp_path / "a.export.safetensors"
    )


def test_compare_tolerance_rules():
    tol = ex.Tolerance()
    ref = torch.tensor([[2.0, 1.0, 0.0], [1.0, 1.00001, 0.0]])
    assert ex.compare(ref, ref + 1e-5, 1, tol).ok
    # a near-tie may flip the top-1 class, a clear winner may not
    flipped = ref.clone()
    flipped[1, 0] += 2e-5
    check = ex.compare(ref, flipped, 1, tol)
    assert check.ok and check.top1_agree == 1
    assert not ex.compare(ref, ref + torch.tensor([0.0, 0.0, 0.01]), 1, tol).ok
    big = ref * 1000  # relative to the image's largest logit
    assert ex.compare(big, big + 0.5, 1, tol).ok
    bad = ex.compare(ref, ref[:, :2], 3, tol)
    assert not bad.ok and "output shape" in bad.problem


def test_tolerance_widens_by_pytorchs_own_float32_error():
    """An ill-conditioned model (logits ~3e3, PyTorch float32 itself 3 off from
    float64) may differ from PyTorch by that much, times fp32_factor; no more."""
    tol = ex.Tolerance()
    ref = torch.tensor([[3000.0, 2900.0, 0.0]])
    exact = ref + torch.tensor([[3.0, -2.0, 0.0]])  # float64: PyTorch's own error is 3
    got = ref + torch.tensor([[-5.0, 4.0, 0.0]])  # the export: 5 from PyTorch, 8 from float64
    alone = ex.compare(ref, got, 1, tol)
    assert not alone.ok and "allowed 3" in alone.problem  # 1e-4 + 1e-3 * 3000
    check = ex.compare(ref, got, 1, tol, exact)
    assert check.ok and check.torch_fp32_error == 3.0
    assert not ex.compare(ref, ref + 20, 1, tol, exact).ok  # beyond 3 + 4 * 3
    # a well-conditioned model's float64 answer changes nothing
    small = torch.tensor([[2.0, 1.0, 0.0]])
    assert not ex.compare(small, small + 0.01, 1, tol, small.double() + 1e-7).ok


def test_exact_logits_are_float64_and_leave_the_model_alone(tiny_checkpoint):
    from imgcls.checkpoint import load_checkpoint

    model = load_checkpoint(tiny_checkpoint).model
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    exact = ex.exact_logits(model, x)
    assert exact.dtype == torch.float64 and exact.shape == (3, 3)
    assert next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert torch.allclose(model(x).double(), exact, atol=1e-5)


def test_float32_error_counts_per_image_not_batch_wide():
    """One image's huge float32 error gives no slack to a well-conditioned neighbour."""
    tol = ex.Tolerance()
    ref = torch.tensor([[3000.0, 2900.0, 0.0], [2.0, 1.0, 0.0]])
    exact = ref + torch.tensor([[300.0, -200.0, 0.0], [1e-7, 0.0, 0.0]])
    assert ex.compare(ref, ref + torch.tensor([[900.0, -900.0, 0.0], [0.0] * 3]), 1, tol, exact).ok
    wrong = ex.compare(ref, ref + torch.tensor([[0.0] * 3, [0.0, 0.0, 0.01]]), 1, tol, exact)
    assert not wrong.ok and "(image 1)" in wrong.problem


def test_top1_is_not_compared_where_float32_itself_gets_it_wrong():
    """Huge logits: softmax is one-hot, and PyTorch float32 already picks another
    class than float64; an export flipping it is as right as PyTorch, unless
    PyTorch's float32 error is small, or another float32 run shows it is."""
    tol = ex.Tolerance()
    ref = torch.tensor([[1000.0, 990.0, 0.0], [2.0, 1.0, 0.0]])
    exact = torch.tensor([[995.0, 1000.0, 0.0], [2.0, 1.0, 0.0]])  # float64: class 1 on image 0
    got = torch.tensor([[990.0, 1000.0, 0.0], [2.0, 1.0, 0.0]])
    check = ex.compare(ref, got, 1, tol, exact)
    assert check.ok and check.top1_agree == 1 and check.top1_unjudged == 1
    assert check.max_prob_diff > 0.99  # the flip moves a probability by ~1
    assert not ex.compare(ref, got, 1, tol, ref).ok  # float32 exact: the flip is a bug
    # the float32 error is the largest over PyTorch's runs (e.g. at another batch size)
    here = exact + torch.tensor([[0.0, 0.5, 0.0], [0.0] * 3])  # 0.5 off float64 at this size...
    other = ref  # ...10 at another, and picking class 0 there
    flip = torch.tensor([[1000.0, 990.0, 0.0], [2.0, 1.0, 0.0]])
    assert not ex.compare(here, flip, 1, tol, exact).ok
    assert ex.compare(here, flip, 1, tol, exact, [other]).ok


def _broken(how: str):
    """A wrapper for :func:`imgcls.export.logits_module` that hands the exporter
    a copy of the model with a real bug: batchnorm in train mode, or the first
    batchnorm dropped."""
    import copy

    real = ex.logits_module

    def logits_module(model, x):
        bad = copy.deepcopy(real(model, x))
        norms = [
            (name, m)
            for name, m in bad.named_modules()
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        ]
        assert norms, "the model has no batchnorm to break"
        if how == "batchnorm in train mode":
            for _, m in norms:
                m.train()
        else:
            name = norms[0][0]
            parent = bad.get_submodule(name.rpartition(".")[0]) if "." in name else bad
            setattr(parent, name.rpartition(".")[2], torch.nn.Identity())
        return bad

    return logits_module


# (torch.onnx exports a train-mode batchnorm as one that onnxruntime runs on
# its running statistics, i.e. correctly: that file passes, rightly)
@pytest.mark.parametrize(
    "fmt, suffix, how",
    [
        ("torchscript", ".pt", "batchnorm in train mode"),
        ("torchscript", ".pt", "dropped layer"),
        ("onnx", ".onnx", "dropped layer"),
    ],
)
def test_a_wrong_export_still_fails(residual_checkpoint, tmp_path, monkeypatch, fmt, suffix, how):
    monkeypatch.setattr(writers, "logits_module", _broken(how))
    with pytest.raises(ImgclsError, match="does not match PyTorch"):
        ex.export_model(residual_checkpoint, fmt, tmp_path / f"m{suffix}")
    no_leftovers(tmp_path, set())
