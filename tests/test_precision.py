"""precision: auto (imgcls.precision): timed per model, recorded in run.json;
deterministic runs measure nothing; train.compile trains."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import TINY_RECIPE
from safetensors.torch import load_file

from imgcls import precision
from imgcls.errors import UsageError
from imgcls.models.build import build_model
from imgcls.recipe import recipe_from_dict
from imgcls.training import train

CPU = torch.device("cpu")


def tiny(**train_overrides):
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["train"].update(train_overrides)
    return recipe_from_dict(raw)


def choose(**kw):
    recipe = tiny()
    model = build_model(recipe.model, recipe.input_shape(), 3)
    args = dict(
        model=model, input_shape=recipe.input_shape(), num_classes=3, batch_size=4, channels_last=False
    )
    return precision.choose(kw.pop("precision", "auto"), CPU, **args, **kw)


def no_timing(*args, **kwargs):
    raise AssertionError("timed although it must not")


@pytest.mark.parametrize(
    ("speeds", "chosen", "ratio"),
    [({"fp32": 100.0, "bf16": 200.0}, "bf16", 2.0), ({"fp32": 100.0, "bf16": 103.0}, "fp32", 1.0)],
)
def test_auto_picks_the_faster_beyond_the_margin(monkeypatch, speeds, chosen, ratio):
    monkeypatch.setattr(precision, "candidates", lambda device: [torch.float32, torch.bfloat16])
    monkeypatch.setattr(precision, "time_candidates", lambda *a, **k: speeds)
    choice = choose(deterministic=False)
    assert (choice.name, choice.how, choice.ratio) == (chosen, "measured", ratio)
    assert choice.info()["img_per_s"] == speeds
    assert f"precision: {chosen} (measured: fp32 100 img/s" in choice.line()


def test_timing_runs_on_a_copy_and_keeps_the_rng(monkeypatch):
    for name in ("WARMUP", "ROUNDS", "STEPS"):
        monkeypatch.setattr(precision, name, 1)
    recipe = tiny()
    model = build_model(recipe.model, recipe.input_shape(), 3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    speeds = precision.time_candidates(model, [torch.float32], CPU, recipe.input_shape(), 3, 4, True)
    assert torch.equal(torch.rand(3), expected)
    assert set(speeds) == {"fp32"} and speeds["fp32"] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_deterministic_short_and_explicit_choices_measure_nothing(monkeypatch):
    monkeypatch.setattr(precision, "candidates", lambda device: [torch.float32, torch.bfloat16])
    monkeypatch.setattr(precision, "time_candidates", no_timing)
    assert choose(deterministic=True).how == "fixed (deterministic)"
    assert choose(deterministic=True).dtype == torch.float32  # the documented CPU choice
    assert choose(deterministic=False, run_steps=10).dtype == torch.float32
    assert choose(precision="bf16", deterministic=False).how == "asked"
    with pytest.raises(UsageError, match="fp16 needs a CUDA device"):
        choose(precision="fp16", deterministic=False)


def test_train_records_the_choice_in_run_json(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "candidates", lambda device: [torch.float32, torch.bfloat16])
    monkeypatch.setattr(precision, "MIN_RUN_STEPS", 0)
    monkeypatch.setattr(precision, "time_candidates", lambda *a, **k: {"fp32": 100.0, "bf16": 150.0})
    lines = []
    run = train(tiny(), out=tmp_path / "auto", log=lines.append).run_dir
    info = json.loads((run / "run.json").read_text())
    assert info["precision"] == "bf16"
    assert info["precision_choice"] == {
        "how": "measured",
        "img_per_s": {"fp32": 100.0, "bf16": 150.0},
        "seconds": info["precision_choice"]["seconds"],
        "ratio_vs_fp32": 1.5,
    }
    assert any(line.startswith("precision: bf16 (measured:") and "1.50x fp32" in line for line in lines)


@pytest.mark.slow
def test_compile_trains_and_reports_compile_time(tmp_path, monkeypatch):
    if not hasattr(torch, "compile"):
        pytest.skip("this torch has no torch.compile")
    # the eager backend: the same dynamo capture and plumbing, without a C++ toolchain's minutes
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    monkeypatch.setattr(precision, "time_candidates", no_timing)  # deterministic: nothing timed
    lines = []
    run = train(tiny(compile=True, deterministic=True), out=tmp_path / "c", log=lines.append)
    info = json.loads((run.run_dir / "run.json").read_text())
    assert info["compile"] is True and info["compile_s"] > 0
    assert (info["precision"], info["precision_choice"]) == ("fp32", {"how": "fixed (deterministic)"})
    assert any(line.startswith("compile: ") and "not counted in img/s" in line for line in lines)
    plain = train(tiny(deterministic=True), out=tmp_path / "p", log=lambda m: None)
    a, b = (load_file(str(r.run_dir / "last.safetensors")) for r in (run, plain))
    assert a.keys() == b.keys()  # the compiled wrapper's prefix never reaches a checkpoint
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
