"""Fine-tuning: local and published starting weights, freezing, unfreeze_at,
layer-wise learning rates, the small-image stem. Offline, tiny."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from conftest import TINY_RECIPE
from safetensors.torch import load_file, save_file

from imgcls import checkpoint as ck
from imgcls.errors import CheckpointError, Interrupted, RecipeError, UsageError
from imgcls.models import finetune
from imgcls.models.build import build_model
from imgcls.recipe import ModelSpec, OptimizerSpec, recipe_from_dict

# TINY_RECIPE with a batch norm, so frozen norms are tested too
BN_LAYERS = [
    {"conv": {"filters": 4, "kernel": 3, "padding": "same", "batch_norm": True, "activation": "relu"}},
    {"maxpool": 2},
    {"conv": {"filters": 8, "kernel": 3, "padding": "same", "activation": "relu"}},
    "global_avg_pool",
]
HEAD = ("head.weight", "head.bias")


def _raw(tmp_path, **train):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["model"] = {"layers": BN_LAYERS, "weights": str(tmp_path / "start.safetensors")}
    raw["train"].update(train)
    return raw


@pytest.fixture(scope="module")
def two_phase(tmp_path_factory):
    """A 2-epoch run from a plain state dict (DDP 'module.' prefixes): backbone
    frozen for epoch 1 (train.unfreeze_at: 1), layer_decay 0.5, head_lr 2;
    last.safetensors snapshotted after each epoch."""
    from imgcls.training import train

    tmp = tmp_path_factory.mktemp("two-phase")
    raw = _raw(tmp, epochs=2, unfreeze_at=1, optimizer={"name": "adam", "layer_decay": 0.5, "head_lr": 2.0})
    recipe = recipe_from_dict(raw)
    torch.manual_seed(1)
    start = build_model(recipe.model.model_copy(update={"weights": None}), (3, 16, 16), 3).state_dict()
    save_file({f"module.{k}": v.contiguous() for k, v in start.items()}, str(tmp / "start.safetensors"))
    snapshots, lines = [], []

    def snapshot(row):
        snapshots.append(load_file(str(tmp / "run" / ck.LAST)))

    train(recipe, base_dir=tmp, out=tmp / "run", log=lines.append, on_epoch_end=snapshot)
    resume = ck.load_resume(tmp / "run" / ck.RESUME)
    return {"start": start, "snapshots": snapshots, "lines": lines, "raw": raw, "tmp": tmp, "resume": resume}


def test_frozen_weights_and_norm_statistics_stay_bit_identical_until_unfreeze_at(two_phase):
    start, (after1, after2) = two_phase["start"], two_phase["snapshots"]
    for key, value in start.items():
        if key.startswith("head."):
            assert not torch.equal(after1[key], value), key  # the head trained in epoch 1
        else:
            # weights and batch-norm running stats: untouched while frozen
            assert torch.equal(after1[key], value), key
    changed = [k for k in start if not k.startswith("head.") and not torch.equal(after2[k], after1[k])]
    assert "conv1.conv.weight" in changed and "conv1.bn.running_mean" in changed
    assert any("frozen (backbone)" in line and "until epoch 1" in line for line in two_phase["lines"])


def test_layer_decay_and_head_lr_set_each_stage_lr(two_phase):
    groups = two_phase["resume"]["optimizer"]["param_groups"]
    base = 1e-3
    # recipe stack: stages conv1 (bn inside), conv2; then the head
    by_stage = {g["stage"]: g["lr"] for g in groups}
    assert by_stage == pytest.approx({0: base * 0.25, 1: base * 0.5, 2: base * 2.0})


def test_resume_across_the_unfreeze_switch_is_exact(two_phase, tmp_path):
    from imgcls.training import train

    recipe = recipe_from_dict(two_phase["raw"])
    with pytest.raises(Interrupted):  # stop one step into epoch 2 (after the switch)
        train(recipe, base_dir=two_phase["tmp"], out=tmp_path / "run", log=lambda m: None, stop_after_steps=3)
    train(recipe, base_dir=two_phase["tmp"], resume=tmp_path / "run", log=lambda m: None)
    resumed = load_file(str(tmp_path / "run" / ck.LAST))
    for key, value in two_phase["snapshots"][1].items():
        assert torch.equal(resumed[key], value), key


def test_freeze_forms_and_bad_patterns():
    model = build_model(recipe_from_dict(TINY_RECIPE).model, (3, 16, 16), 3)
    names = {n for n, _ in model.named_parameters()}
    assert finetune.frozen_names(model, "backbone") == names - set(HEAD)
    assert finetune.frozen_names(model, 1) == {"conv1.conv.weight", "conv1.conv.bias"}
    assert finetune.frozen_names(model, ["conv2*"]) == {"conv2.conv.weight", "conv2.conv.bias"}
    assert finetune.frozen_names(model, ["*.bias"]) == {n for n in names if n.endswith("bias")}
    with pytest.raises(RecipeError, match="'layer9' matches no parameter"):
        finetune.frozen_names(model, ["layer9"])
    with pytest.raises(RecipeError, match="only 2 stages"):
        finetune.frozen_names(model, 3)


def test_torchvision_stages_follow_the_family_structure():
    import torchvision

    from imgcls.summary import meta_init

    with meta_init():
        resnet = torchvision.models.resnet18(num_classes=4)
        mobilenet = torchvision.models.mobilenet_v3_small(num_classes=4)
    assert [s for s, _ in finetune.stages(resnet)] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert finetune.stages(resnet)[0][1] == ["conv1", "bn1"]
    assert finetune.head_name(mobilenet) == "classifier"
    assert len(finetune.stages(mobilenet)) == len(mobilenet.features)
    groups = finetune.param_groups(resnet, OptimizerSpec(layer_decay=0.5, head_lr=10.0))
    scale = {g["stage"]: g["lr_scale"] for g in groups}
    assert scale == {0: 0.5**5, 1: 0.5**4, 2: 0.5**3, 3: 0.5**2, 4: 0.5, 5: 10.0}
    assert sum(len(g["params"]) for g in groups) == len(list(resnet.parameters()))


def test_local_weights_head_replaced_or_refused(tiny_checkpoint, tmp_path):
    spec = recipe_from_dict(TINY_RECIPE).model.model_copy(update={"weights": str(tiny_checkpoint)})
    lines = []
    model = build_model(spec, (3, 16, 16), 5, log=lines.append)  # 3-class file, 5 classes here
    state = load_file(str(tiny_checkpoint))
    assert torch.equal(model.state_dict()["conv2.conv.weight"], state["conv2.conv.weight"])
    assert model.head.out_features == 5
    assert any("replaced by a new 5-class one" in line for line in lines)

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match=f"model.weights: {missing}: no such file"):
        build_model(spec.model_copy(update={"weights": str(missing)}), (3, 16, 16), 3)
    other = tmp_path / "other.safetensors"
    save_file({"conv1.conv.weight": torch.zeros(4, 1, 3, 3)}, str(other))
    with pytest.raises(CheckpointError, match=r"conv1.conv.weight has shape \[4, 1, 3, 3\]"):
        build_model(spec.model_copy(update={"weights": str(other)}), (3, 16, 16), 3)
    with pytest.raises(UsageError, match="only .safetensors"):
        build_model(spec.model_copy(update={"weights": str(tmp_path / "w.pth")}), (3, 16, 16), 3)


def test_published_weights_from_the_hub_cache_with_a_new_head(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
    weights = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT
    cached = tmp_path / "hub" / "hub" / "checkpoints" / os.path.basename(weights.url)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    planted = torchvision.models.mobilenet_v3_small().state_dict()
    torch.save(planted, cached)
    lines = []
    spec = ModelSpec(arch="mobilenet_v3_small", pretrained=True, freeze="backbone")
    model = build_model(spec, (3, 32, 32), 4, log=lines.append)
    assert torch.equal(model.state_dict()["features.0.0.weight"], planted["features.0.0.weight"])
    assert model.classifier[-1].out_features == 4
    assert any("1000-class classifier replaced by a new 4-class one" in line for line in lines)


def test_timm_names_without_timm_say_which_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(UsageError, match=r"needs timm: pip install 'imgcls\[timm\]'"):
        build_model(ModelSpec(arch="timm/resnet18", pretrained=True), (3, 32, 32), 4)


def test_recipe_keys_are_checked():
    with pytest.raises(RecipeError, match="not both"):
        recipe_from_dict({"model": {"arch": "resnet18", "pretrained": True, "weights": "w.safetensors"}})
    with pytest.raises(RecipeError, match="'stem' applies to a named architecture"):
        recipe_from_dict({"model": {"layers": ["flatten"], "stem": "small"}})
    with pytest.raises(RecipeError, match="model.freeze"):
        recipe_from_dict({"model": {"arch": "resnet18", "freeze": True}})


def test_small_stem_shows_in_summarize_and_is_refused_where_undefined():
    from imgcls.summary import summarize_target

    default = summarize_target("resnet18", input_shape=(3, 32, 32), num_classes=6)
    small = summarize_target(
        "resnet18", input_shape=(3, 32, 32), num_classes=6, overrides=["model.stem=small"]
    )
    layer1 = [{r.name: r.output_shape for r in s.rows}["layer1"] for s in (default, small)]
    assert layer1 == [(1, 64, 8, 8), (1, 64, 32, 32)]
    assert small.total_params < default.total_params  # 3x3 instead of 7x7 stem
    with pytest.raises(
        UsageError, match=r"model.stem: small is defined for resnet\*.*not for 'vgg11'"
    ) as info:
        summarize_target("vgg11", input_shape=(3, 32, 32), overrides=["model.stem=small"])
    assert info.value.exit_code == 2 and "\n" not in str(info.value)


def test_summarize_shows_frozen_parameters_as_non_trainable(tmp_path):
    import yaml

    from imgcls.summary import summarize_target

    raw = copy.deepcopy(TINY_RECIPE)
    raw["model"]["freeze"] = "backbone"
    path = tmp_path / "frozen.yaml"
    path.write_text(yaml.safe_dump(raw))
    summary = summarize_target(str(path))
    assert summary.trainable_params == 8 * 3 + 3  # the head alone
    assert summary.non_trainable_params == summary.total_params - 27
    rows = {r.name: r.trainable for r in summary.rows}
    assert rows["conv1"] == "no" and rows["head"] == "yes"


def test_a_single_freeze_pattern_is_a_list_of_one():
    spec = recipe_from_dict({"model": {"arch": "resnet18", "freeze": "layer1*"}}).model
    assert spec.freeze == ["layer1*"]


def test_timm_weights_come_from_the_local_cache_and_the_environment_is_left_alone(tmp_path, monkeypatch):
    """No process-wide HF_HUB_OFFLINE toggle (threads would see it): the cached file is handed to timm."""
    import os

    timm = pytest.importorskip("timm")
    import huggingface_hub
    from huggingface_hub import constants
    from safetensors.torch import save_file

    name, repo = "test_resnet", tmp_path / "hub" / "models--timm--test_resnet.r160_in1k"  # its default tag
    torch.manual_seed(5)
    planted = timm.create_model(name, pretrained=False).state_dict()
    (repo / "snapshots" / "abc").mkdir(parents=True)
    save_file(planted, str(repo / "snapshots" / "abc" / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    seen = []
    real = timm.create_model

    def create(*args, **kwargs):
        seen.append(os.environ.get("HF_HUB_OFFLINE"))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", create)
    model = build_model(ModelSpec(arch=f"timm/{name}", pretrained=True), (3, 32, 32), 4)
    assert seen == [None]
    assert torch.equal(model.state_dict()["conv1.0.weight"], planted["conv1.0.weight"])
