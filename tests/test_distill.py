"""Knowledge distillation (`train.distill`): the loss, the teacher's three
forms, the cached and per-step teacher logits, and how distillation meets
resume, accumulation, EMA, freezing, streaming, multi-label, tune and DDP.

One teacher is trained once (module fixture) on the 3-class shapes folder;
the students are smaller and train 2 epochs on the same images."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE, save_tiny_checkpoint

from imgcls.errors import Interrupted, RecipeError
from imgcls.recipe import recipe_from_dict

pytestmark = pytest.mark.filterwarnings("ignore")

STUDENT_LAYERS = [
    {"conv": {"filters": 2, "kernel": 3, "padding": "same", "activation": "relu"}},
    {"maxpool": 2},
    {"conv": {"filters": 4, "kernel": 3, "padding": "same", "activation": "relu"}},
    "global_avg_pool",
]


def _quiet(message: str) -> None:
    pass


def _train(raw: dict, **kwargs):
    from imgcls.training import train

    return train(recipe_from_dict(raw), **{"log": _quiet, **kwargs})


def _weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "last.safetensors"))


def _assert_same_weights(a: Path, b: Path, **tolerance) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], **(tolerance or {"rtol": 0, "atol": 0}))


def _student(folder: Path, teacher: Path | str, out: Path, **train) -> dict:
    """The student: 1/4 of the teacher's filters, frozen backbone for epoch 1, EMA."""
    raw = copy.deepcopy(TINY_RECIPE)
    raw["name"] = "student"
    raw["data"] = {"source": "folder", "path": str(folder), "image_size": 16}
    raw["model"] = {"layers": copy.deepcopy(STUDENT_LAYERS), "freeze": "backbone"}
    raw["train"] = {
        "epochs": 2,
        "batch_size": 4,
        "deterministic": True,
        "unfreeze_at": 1,
        "ema": 0.9,
        "distill": {"teacher": str(teacher), "temperature": 2.0, "alpha": 0.7},
        "out": str(out),
        **train,
    }
    return raw


@pytest.fixture(scope="module")
def teacher(shapes_folder, tmp_path_factory) -> dict:
    """A run folder, the same weights as a lone checkpoint, and their ONNX export."""
    from imgcls.export.writers import export_model

    tmp = tmp_path_factory.mktemp("teacher")
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"] = {"source": "folder", "path": str(shapes_folder), "image_size": 16}
    raw["train"] = {"epochs": 2, "batch_size": 4, "out": str(tmp / "runs")}
    run = _train(raw, out=tmp / "run").run_dir
    checkpoint = tmp / "teacher.safetensors"
    shutil.copy(run / "best.safetensors", checkpoint)
    onnx = export_model(run, "onnx", tmp / "teacher.onnx").path
    return {"run": run, "checkpoint": checkpoint, "onnx": onnx, "tmp": tmp}


@pytest.fixture(scope="module")
def students(teacher, shapes_folder, tmp_path_factory) -> dict:
    """Distilled students trained the same way by different paths: the
    reference (cached teacher logits); per-step teacher logits, over streamed
    batches, in 2 micro-batches of 2; stopped after 3 steps, then resumed."""
    from imgcls.training import distill

    tmp = tmp_path_factory.mktemp("students")
    logs: dict[str, list[str]] = {}

    def run(name: str, raw: dict, **kwargs) -> Path:
        logs[name] = []
        return _train(raw, out=tmp / name, log=logs[name].append, **kwargs).run_dir

    cached = run("cached", _student(shapes_folder, teacher["run"], tmp))
    # per step, 2 micro-batches of 2, batches streamed from the disk cache: the same student
    per_step = _student(shapes_folder, teacher["run"], tmp, batch_size=2, gradient_accumulation=2)
    per_step["data"]["cache"] = "disk"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distill, "cacheable", lambda run: False)
        mp.setenv("IMGCLS_BATCHES", "stream")
        run("per_step", per_step)
    with pytest.raises(Interrupted):
        run("stopped", _student(shapes_folder, teacher["run"], tmp), stop_after_steps=3)
    logs["resumed"] = []
    _train(_student(shapes_folder, teacher["run"], tmp), resume=tmp / "stopped", log=logs["resumed"].append)
    return {"cached": cached, "per_step": tmp / "per_step", "resumed": tmp / "stopped", "logs": logs}


# --------------------------------------------------------------------------- the loss


def test_the_loss_matches_a_hand_computation():
    from imgcls.training.distill import distill_loss

    s, t, T = [1.0, 2.0, 0.5], [0.2, 3.0, -1.0], 2.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    p, q = softmax(t), softmax(s)
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    got = distill_loss(torch.tensor([s]), torch.tensor([t]), T, multilabel=False)
    assert float(got) == pytest.approx(T * T * kl, rel=1e-6)

    # multi-label: each label's binary KL of the softened sigmoids, mean over labels
    def sig(x):
        return 1 / (1 + math.exp(-x / T))

    bkl = [
        sig(ti) * math.log(sig(ti) / sig(si)) + (1 - sig(ti)) * math.log((1 - sig(ti)) / (1 - sig(si)))
        for si, ti in zip(s, t, strict=True)
    ]
    got = distill_loss(torch.tensor([s]), torch.tensor([t]), T, multilabel=True)
    assert float(got) == pytest.approx(T * T * sum(bkl) / 3, rel=1e-5)
    # the same outputs: nothing to learn from the teacher
    assert float(distill_loss(torch.tensor([t]), torch.tensor([t]), T, multilabel=False)) == pytest.approx(
        0, abs=1e-7
    )


def test_alpha_weighs_the_teachers_term_against_the_usual_loss():
    from imgcls.training.distill import Teacher, distill_loss

    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 3.0, -1.0]])
    stats = (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    teacher = Teacher(None, 4.0, 0.25, False, torch.device("cpu"), torch.float32, stats, cache=t)  # type: ignore[arg-type]
    usual = torch.tensor(1.5)
    got = teacher.loss(s, usual, torch.tensor([0]), torch.zeros(1, 3, 2, 2))
    assert float(got) == pytest.approx(0.25 * float(distill_loss(s, t, 4.0, False)) + 0.75 * 1.5, rel=1e-6)


# --------------------------------------------------------------------------- the teacher


def test_a_run_a_checkpoint_and_an_onnx_export_give_the_same_teacher_logits(teacher):
    """...and the logits imgcls predict computes from the same pixels."""
    from imgcls.training.distill import Teacher, open_teacher, teacher_logits

    spec = recipe_from_dict({"model": {"arch": "x"}, "train": {"distill": "t"}}).train.distill
    pixels = torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8)
    stats = (torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    got = {}
    for kind in ("run", "checkpoint", "onnx"):
        predictor = open_teacher(spec.model_copy(update={"teacher": str(teacher[kind])}), Path("."), _quiet)
        bound = Teacher(predictor, 4.0, 0.5, False, torch.device("cpu"), torch.float32, stats)
        got[kind] = teacher_logits(bound, pixels, batch_size=2)
        torch.testing.assert_close(got[kind], predictor.batch_logits(pixels), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["checkpoint"], got["run"], rtol=0, atol=0)
    torch.testing.assert_close(got["onnx"], got["run"], rtol=1e-4, atol=1e-5)


def test_the_teacher_gets_its_own_size_channels_and_statistics(teacher):
    """A teacher at 3x16x16 teaching a grey 8x8 student: the student's pixels,
    repeated to RGB and resized, normalised with the teacher's mean/std."""
    import torch.nn.functional as F

    from imgcls.training.distill import Teacher, open_teacher

    spec = recipe_from_dict({"model": {"arch": "x"}, "train": {"distill": str(teacher["run"])}}).train.distill
    predictor = open_teacher(spec, Path("."), _quiet)
    grey = torch.rand(2, 1, 8, 8)
    stats = (torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    bound = Teacher(predictor, 4.0, 0.5, False, torch.device("cpu"), torch.float32, stats)
    rgb = F.interpolate(grey.expand(-1, 3, -1, -1), size=(16, 16), mode="bilinear", antialias=True)
    expected = predictor.batch_logits(rgb)  # float 0..1 input: normalised with the teacher's own mean/std
    torch.testing.assert_close(bound.logits(grey), expected, rtol=1e-5, atol=1e-6)


def test_classes_in_another_order_are_matched_by_name():
    from imgcls.training.distill import class_order

    lines: list[str] = []
    order = class_order(["b", "c", "a"], ["a", "b", "c"], "t.onnx", lines.append)
    assert order is not None and order.tolist() == [2, 0, 1]
    assert torch.tensor([[10.0, 20.0, 30.0]])[:, order].tolist() == [[30.0, 10.0, 20.0]]
    assert lines == ["distill: the teacher's classes are in another order; its outputs are matched by name"]
    assert class_order(["a", "b"], ["a", "b"], "t", lines.append) is None


def test_a_teacher_with_other_classes_is_refused_in_one_line_before_training(shapes_folder, tmp_path, cli):
    other = save_tiny_checkpoint(tmp_path / "other.safetensors", ["cat", "dog", "fish"])
    recipe = tmp_path / "student.yaml"
    recipe.write_text(yaml.safe_dump(_student(shapes_folder, "other.safetensors", tmp_path / "runs")))
    result = cli("train", str(recipe))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: train.distill.teacher: {other}: the teacher's classes ['cat', 'dog', 'fish'] "
        "differ from the data's ['circle', 'square', 'triangle']"
    ), result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("distill", "message"),
    [
        ({"teacher": "t", "temperature": 0}, "train.distill.temperature: Input should be greater than 0"),
        ({"teacher": "t", "temperature": -2}, "train.distill.temperature: Input should be greater than 0"),
        ({"teacher": "t", "alpha": 1.5}, "train.distill.alpha: Input should be less than or equal to 1"),
        ({"teacher": "t", "alpha": -0.1}, "train.distill.alpha: Input should be greater than or equal to 0"),
        ({"temperature": 2}, "train.distill.teacher: Field required"),
    ],
)
def test_bad_values_are_refused(distill, message):
    with pytest.raises(RecipeError, match=message):
        recipe_from_dict({"model": {"arch": "resnet18"}, "train": {"distill": distill}})


def test_a_missing_teacher_is_refused_before_the_data_is_read(tmp_path, cli):
    recipe = tmp_path / "student.yaml"
    recipe.write_text(yaml.safe_dump(_student(tmp_path / "no-data", "runs/teacher/9", tmp_path / "runs")))
    result = cli("train", str(recipe))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: train.distill.teacher: {tmp_path / 'runs/teacher/9'}: no such run folder, checkpoint or export"
    ]
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- whole runs


def test_cached_and_per_step_teacher_logits_train_the_same_student(students):
    """...with the per-step run also in 2 micro-batches (gradient accumulation) and streamed."""
    logs = students["logs"]
    assert any("its logits computed once per image (18 images" in m for m in logs["cached"]), logs["cached"]
    assert any("its logits computed per step, on the augmented batch" in m for m in logs["per_step"])
    assert any(m.startswith("batches: streamed from 18 cached rows") for m in logs["per_step"])
    # per step, the teacher's input is rebuilt from the normalised batch: equal up to float rounding
    _assert_same_weights(students["cached"], students["per_step"], rtol=1e-5, atol=1e-6)
    recipe = yaml.safe_load((students["cached"] / "recipe.yaml").read_text())
    assert Path(recipe["train"]["distill"]["teacher"]).is_absolute()


def test_a_resumed_distilled_run_equals_the_uninterrupted_one(students):
    assert any("its logits computed once per image" in m for m in students["logs"]["resumed"])
    _assert_same_weights(students["cached"], students["resumed"])


def test_augmentation_makes_the_teacher_run_every_step_and_distillation_moves_the_student(
    teacher, students, shapes_folder, tmp_path
):
    """alpha 1: the teacher alone teaches. The student's outputs get closer to
    the teacher's than the same student trained without it (alpha 0)."""
    logs: dict[str, list[str]] = {"on": [], "off": []}
    runs = {}
    for name, alpha in (("on", 1.0), ("off", 0.0)):
        raw = _student(shapes_folder, teacher["onnx"], tmp_path, ema=None, unfreeze_at=None)
        raw["model"].pop("freeze")
        raw["data"]["augment"] = {"hflip": True}
        raw["train"]["distill"]["alpha"] = alpha
        runs[name] = _train(raw, out=tmp_path / name, log=logs[name].append).run_dir
    assert any("its logits computed per step" in m for m in logs["on"]), logs["on"]
    from imgcls.checkpoint import load_checkpoint
    from imgcls.predictor import load_predictor

    pixels = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    target = torch.softmax(load_predictor(teacher["run"], log=_quiet).batch_logits(pixels) / 2, 1)

    def gap(run: Path) -> float:
        predictor = load_predictor(run, log=_quiet)
        return float((torch.softmax(predictor.batch_logits(pixels) / 2, 1) - target).abs().mean())

    assert gap(runs["on"]) < gap(runs["off"])
    assert load_checkpoint(runs["on"]).meta["recipe"]["train"]["distill"]["alpha"] == 1.0


def test_multilabel_distills_on_sigmoids(tmp_path):
    from test_multilabel import KINDS, write_multilabel

    from imgcls.checkpoint import save_checkpoint
    from imgcls.models.build import build_model

    labels = write_multilabel(tmp_path / "ml", 24)
    raw = copy.deepcopy(TINY_RECIPE)
    raw["name"] = "ml"
    raw["data"] = {"source": "csv", "path": str(labels), "image_size": 16}
    recipe = recipe_from_dict(raw)
    meta = {
        "recipe": copy.deepcopy(raw),
        "classes": sorted(KINDS),
        "input_shape": [3, 16, 16],
        "preprocessing": {
            "image_size": [16, 16],
            "channels": 3,
            "mean": [0.5] * 3,
            "std": [0.25] * 3,
            "resize": "stretch",
        },
        "task": "multilabel",
    }
    save_checkpoint(tmp_path / "teacher.safetensors", build_model(recipe.model, (3, 16, 16), 4), meta)
    raw["model"] = {"layers": copy.deepcopy(STUDENT_LAYERS)}
    raw["train"] = {"epochs": 1, "batch_size": 4, "out": str(tmp_path / "runs")}
    raw["train"]["distill"] = {"teacher": str(tmp_path / "teacher.safetensors"), "temperature": 3.0}
    lines: list[str] = []
    result = _train(raw, out=tmp_path / "student", log=lines.append)
    assert any("its logits computed once per image" in m for m in lines), lines
    assert math.isfinite(result.history[-1]["train_loss"]) and "val_f1" in result.history[-1]
    # a multi-label teacher for single-label data is refused
    meta["task"] = "single"
    save_checkpoint(tmp_path / "single.safetensors", build_model(recipe.model, (3, 16, 16), 4), meta)
    raw["train"]["distill"] = {"teacher": str(tmp_path / "single.safetensors")}
    with pytest.raises(RecipeError, match="is a single-label model, the data is multi-label"):
        _train(raw, out=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_tune_sets_the_teacher_and_searches_temperature_and_alpha(teacher, shapes_folder, tmp_path, cli):
    raw = _student(shapes_folder, "unused", tmp_path / "runs", epochs=1, unfreeze_at=None)
    del raw["train"]["distill"]
    raw["model"].pop("freeze")
    (tmp_path / "student.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "student.space.yaml").write_text(
        "train.distill.temperature: {uniform: [1, 8]}\ntrain.distill.alpha: {uniform: [0, 1]}\n"
    )
    relative = os.path.relpath(teacher["run"], tmp_path)  # from the recipe's folder, as data.path
    result = cli(
        "tune",
        str(tmp_path / "student.yaml"),
        "--set",
        f"train.distill.teacher={relative}",
        "--trials",
        "1",
        "--json",
        cwd=tmp_path.parent,  # the teacher's path is read from the recipe's folder, not from here
    )
    assert result.returncode == 0, result.stderr
    trials = json.loads(result.stdout)["trials"]
    assert [t["state"] for t in trials] == ["complete"]
    distill = yaml.safe_load((tmp_path / trials[0]["run_dir"] / "recipe.yaml").read_text())["train"][
        "distill"
    ]
    assert Path(distill["teacher"]) == teacher["run"].resolve()
    # sampled, not the defaults (4 and 0.5)
    assert 1 <= distill["temperature"] <= 8 and distill["temperature"] != 4
    assert 0 <= distill["alpha"] <= 1 and distill["alpha"] != 0.5


# distill × ddp (2 ranks equal 1 process, the cached logits taken by rows) is a run of the
# interaction matrix: test_interactions.py::test_ddp_with_class_weights_and_balanced_sampler
