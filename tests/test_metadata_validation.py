"""Checkpoints and exported files are input: crafted imgcls metadata is refused
with one line naming the file and the key, before anything is built or decoded."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from imgcls.checkpoint import load_checkpoint, load_resume, read_meta
from imgcls.errors import CheckpointError
from imgcls.export import load_exported

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")

# (edit of the metadata dict, text the error must contain)
RULES = [
    (lambda m: m.pop("classes"), "classes: missing"),
    (lambda m: m.update(classes="abc"), "classes: not a non-empty list"),
    (lambda m: m.update(classes=["a", "b", "a"]), "classes[2]: 'a' appears twice"),
    (lambda m: m.update(classes=["a", "", "c"]), "classes[1]: '' is not a non-empty name"),
    (lambda m: m.update(classes=["a", 2, "c"]), "classes[1]: 2 is not a non-empty name"),
    (lambda m: m.pop("preprocessing"), "preprocessing: missing"),
    (
        lambda m: m["preprocessing"].update(image_size=[100000, 100000]),
        "preprocessing.image_size: 100000x100000 is outside 1..4096",
    ),
    (lambda m: m["preprocessing"].update(image_size=[0, 16]), "preprocessing.image_size: 0x16"),
    (lambda m: m["preprocessing"].update(image_size=[16.5, 16]), "preprocessing.image_size: [16.5, 16]"),
    (lambda m: m["preprocessing"].update(channels=2), "preprocessing.channels: 2 is not 1"),
    (lambda m: m["preprocessing"].update(channels=True), "preprocessing.channels: True"),
    (
        lambda m: m["preprocessing"].update(mean=[0.5, 0.5]),
        "preprocessing.mean: [0.5, 0.5] is not a list of 3",
    ),
    (lambda m: m["preprocessing"].update(std=[0.25, 0.0, 0.25]), "preprocessing.std[1]: 0.0 is not positive"),
    (lambda m: m["preprocessing"].update(std=[0.25, -1, 0.25]), "preprocessing.std[1]: -1 is not positive"),
    (lambda m: m["preprocessing"].update(mean=[0.5, math.nan, 0.5]), "preprocessing.mean[1]: nan"),
    (lambda m: m["preprocessing"].update(std=[math.inf, 1, 1]), "preprocessing.std[0]: inf"),
    (lambda m: m["preprocessing"].update(resize="zoom"), "preprocessing.resize: 'zoom' is not one of"),
    (lambda m: m["preprocessing"].update(resize_to=10**9), "preprocessing.resize_to: 1000000000"),
    (lambda m: m["preprocessing"].update(interpolation="lanczos"), "preprocessing.interpolation: 'lanczos'"),
    (
        lambda m: m.update(input_shape=[3, 32, 32]),
        "input_shape: [3, 32, 32] does not match the preprocessing",
    ),
    (lambda m: m.update(format="someone-else"), "(not an imgcls"),
    (lambda m: m.update(version=99), "format version 99 is newer than this imgcls reads"),
    (lambda m: m.update(version="1"), "version: '1' is not a version number"),
]
RULE_IDS = [r[1].split(":")[0].split(" ")[0] + f"-{i}" for i, r in enumerate(RULES)]


def _header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def doctored_checkpoint(src: Path, dst: Path, edit=None, raw: str | None = None, key: str = "imgcls") -> Path:
    header = _header(src)
    if raw is None:
        meta = json.loads(header[key])
        edit(meta)
        raw = json.dumps(meta)
    header[key] = raw
    save_file(load_file(str(src)), str(dst), metadata=header)
    return dst


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("edit, message", RULES, ids=RULE_IDS)
def test_checkpoint_rules(tiny_checkpoint, tmp_path, edit, message):
    bad = doctored_checkpoint(tiny_checkpoint, tmp_path / "bad.safetensors", edit)
    with pytest.raises(CheckpointError) as info:
        read_meta(bad)
    text = str(info.value)
    assert text.startswith(f"{bad}: ") and message in text and "\n" not in text


def test_wrong_format_is_not_called_newer(tiny_checkpoint, tmp_path):
    bad = doctored_checkpoint(tiny_checkpoint, tmp_path / "b.safetensors", lambda m: m.update(format="x"))
    with pytest.raises(CheckpointError, match="not an imgcls checkpoint") as info:
        read_meta(bad)
    assert "newer" not in str(info.value)


def test_malformed_json_names_the_file(tiny_checkpoint, tmp_path):
    bad = doctored_checkpoint(
        tiny_checkpoint, tmp_path / "b.safetensors", raw='{"format": "imgcls-checkpoint",'
    )
    with pytest.raises(CheckpointError, match=r"b\.safetensors: imgcls metadata is not valid JSON"):
        read_meta(bad)
    bad = doctored_checkpoint(tiny_checkpoint, tmp_path / "c.safetensors", raw="[1, 2]")
    with pytest.raises(CheckpointError, match="not a JSON object"):
        read_meta(bad)


def test_classes_must_match_the_head(tiny_checkpoint, tmp_path):
    bad = doctored_checkpoint(
        tiny_checkpoint, tmp_path / "b.safetensors", lambda m: m.update(classes=["a", "b", "c", "d"])
    )
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert str(info.value) == (
        f"{bad}: classes: 4 names, but the head (head.weight, shape [3, 8]) has 3 outputs"
    )


@pytest.mark.parametrize("names", [4, 2])
def test_wrong_class_count_without_a_dense_head_names_classes(tmp_path, names):
    """A stack whose last conv is as wide as its classes gets no dense head; a
    class list of another length then names the classes key and both counts,
    not a head the file never had."""
    from imgcls.checkpoint import save_checkpoint
    from imgcls.models.build import build_model
    from imgcls.recipe import recipe_from_dict, recipe_to_dict

    recipe = recipe_from_dict(
        {
            "name": "headless",
            "data": {"source": "shapes", "image_size": 8},
            "model": {"layers": [{"conv": {"filters": 3, "kernel": 3}}, "global_avg_pool"]},
        }
    )
    model = build_model(recipe.model, recipe.input_shape(), 3)
    assert not any(k.startswith("head.") for k in model.state_dict())
    bad = tmp_path / "b.safetensors"
    pre = {"image_size": [8, 8], "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "resize": "stretch"}
    classes = [f"c{i}" for i in range(names)]
    meta = {
        "recipe": recipe_to_dict(recipe),
        "classes": classes,
        "input_shape": [3, 8, 8],
        "preprocessing": pre,
    }
    save_checkpoint(bad, model, meta)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(bad)
    assert str(info.value) == f"{bad}: classes: {names} names, but the model in the file has 3 outputs"


def test_missing_and_unexpected_tensors_are_named(tiny_checkpoint, tmp_path):
    tensors = load_file(str(tiny_checkpoint))
    tensors["extra.weight"] = tensors.pop("head.bias")
    bad = tmp_path / "b.safetensors"
    save_file(tensors, str(bad), metadata=_header(tiny_checkpoint))
    with pytest.raises(
        CheckpointError, match=r"do not fit the architecture \(missing head\.bias; unexpected extra\.weight\)"
    ):
        load_checkpoint(bad)


def test_load_weights_names_the_tensor_for_every_caller(tiny_checkpoint):
    from imgcls.models.state import load_weights

    model = load_checkpoint(tiny_checkpoint).model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["head.weight"] = torch.zeros(5, 8)
    with pytest.raises(
        CheckpointError, match=r"run/last\.safetensors: .*head\.weight has shape \[5, 8\].*expects \[3, 8\]"
    ):
        load_weights(model, state, where="run/last.safetensors")


class _Payload:
    def __reduce__(self):
        return (print, ("this would run",))


def test_refused_pickle_gives_no_unsafe_advice(tmp_path):
    path = tmp_path / "resume.pt"
    path.write_bytes(pickle.dumps({"epoch": 1, "x": _Payload()}))
    torch.save({"epoch": 1, "x": _Payload()}, path)
    with pytest.raises(CheckpointError) as info:
        load_resume(path)
    text = str(info.value)
    assert text.startswith(f"{path}: refused") and "weights_only" not in text and "\n" not in text


# --------------------------------------------------------------------------- exports


@pytest.fixture(scope="module")
def exports(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    from imgcls.export import export_model

    out = tmp_path_factory.mktemp("exports")
    return {
        "onnx": export_model(tiny_checkpoint, "onnx", out / "m.onnx").path,
        "torchscript": export_model(tiny_checkpoint, "torchscript", out / "m.pt").path,
        "safetensors": export_model(tiny_checkpoint, "safetensors", out / "m.safetensors").path,
    }


def doctored_onnx(src: Path, dst: Path, edit=None, raw: str | None = None) -> Path:
    import onnx

    proto = onnx.load(str(src))
    entry = next(p for p in proto.metadata_props if p.key == "imgcls")
    if raw is None:
        meta = json.loads(entry.value)
        edit(meta)
        raw = json.dumps(meta)
    entry.value = raw
    onnx.save(proto, str(dst))
    return dst


def doctored_torchscript(src: Path, dst: Path, edit=None, raw: str | None = None) -> Path:
    files = {"imgcls.json": ""}
    module = torch.jit.load(str(src), _extra_files=files)
    if raw is None:
        meta = json.loads(files["imgcls.json"])
        edit(meta)
        raw = json.dumps(meta)
    torch.jit.save(module, str(dst), _extra_files={"imgcls.json": raw})
    return dst


EXPORT_RULES = [RULES[i] for i in (0, 2, 6, 9, 13, 16, 19, 21)]


@pytest.mark.parametrize(
    "edit, message", EXPORT_RULES, ids=[RULE_IDS[i] for i in (0, 2, 6, 9, 13, 16, 19, 21)]
)
def test_onnx_metadata_rules(exports, tmp_path, edit, message):
    bad = doctored_onnx(exports["onnx"], tmp_path / "bad.onnx", edit)
    with pytest.raises(CheckpointError) as info:
        load_exported(bad)
    assert str(info.value).startswith(f"{bad}: ") and message in str(info.value)


@pytest.mark.parametrize("edit, message", EXPORT_RULES[:4], ids=[RULE_IDS[i] for i in (0, 2, 6, 9)])
def test_torchscript_metadata_rules(exports, tmp_path, edit, message):
    bad = doctored_torchscript(exports["torchscript"], tmp_path / "bad.pt", edit)
    with pytest.raises(CheckpointError) as info:
        load_exported(bad)
    assert str(info.value).startswith(f"{bad}: ") and message in str(info.value)


def test_export_format_version_and_json(exports, tmp_path):
    cases = [
        (dict(edit=lambda m: m.update(format="imgcls-checkpoint")), "not an imgcls export"),
        (dict(edit=lambda m: m.update(version=2)), "export format version 2 is newer"),
        (dict(raw="{not json"), "imgcls metadata is not valid JSON"),
        (dict(edit=lambda m: m.update(batch_size=-3)), "batch_size: -3"),
    ]
    for i, (how, message) in enumerate(cases):
        for bad in (
            doctored_onnx(exports["onnx"], tmp_path / f"{i}.onnx", **how),
            doctored_torchscript(exports["torchscript"], tmp_path / f"{i}.pt", **how),
        ):
            with pytest.raises(CheckpointError, match=message):
                load_exported(bad)


def test_onnx_classes_must_match_the_graph_output(exports, tmp_path):
    bad = doctored_onnx(exports["onnx"], tmp_path / "b.onnx", lambda m: m.update(classes=["a", "b"]))
    with pytest.raises(
        CheckpointError, match=r"b\.onnx: classes: 2 names, but the graph's output \(logits\) has 3"
    ):
        load_exported(bad)


def test_torchscript_classes_must_match_the_output(exports, tmp_path):
    bad = doctored_torchscript(
        exports["torchscript"], tmp_path / "b.pt", lambda m: m.update(classes=["a", "b"])
    )
    model = load_exported(bad)
    with pytest.raises(
        CheckpointError, match=r"b\.pt: classes: 2 names, but the model's output has shape \[1, 3\]"
    ):
        model(torch.zeros(1, 3, 16, 16))


def test_safetensors_export_header_is_checked(exports, tmp_path):
    src = exports["safetensors"]
    bad = doctored_checkpoint(
        src, tmp_path / "v.safetensors", lambda m: m.update(version=7), key="imgcls.export"
    )
    with pytest.raises(CheckpointError, match="export format version 7 is newer"):
        load_exported(bad)
    bad = doctored_checkpoint(
        src, tmp_path / "c.safetensors", lambda m: m.update(classes=["x", "y", "z"]), key="imgcls.export"
    )
    with pytest.raises(CheckpointError, match=r"c\.safetensors: classes: the export metadata .* disagree"):
        load_exported(bad)


def test_a_pickle_named_pt_is_refused_without_unsafe_advice(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError) as info:
        load_exported(path)
    text = str(info.value)
    assert text.startswith(f"{path}: not a TorchScript file") and "weights_only" not in text


# --------------------------------------------------------------------------- through the CLI


@pytest.mark.slow  # four real command runs
def test_cli_refuses_crafted_files_with_exit_2(cli, tiny_checkpoint, exports, shapes_folder, tmp_path):
    huge = doctored_checkpoint(
        tiny_checkpoint,
        tmp_path / "huge.safetensors",
        lambda m: (
            m["preprocessing"].update(image_size=[1000000, 1000000])
            or m.update(input_shape=[3, 1000000, 1000000])
        ),
    )
    image = next((shapes_folder / "circle").glob("*.png"))
    result = cli("predict", str(image), "--model", str(huge))
    assert result.returncode == 2
    assert f"{huge}: preprocessing.image_size: 1000000x1000000 is outside 1..4096" in result.stderr

    broken = doctored_checkpoint(tiny_checkpoint, tmp_path / "broken.safetensors", raw="{oops")
    result = cli("evaluate", str(broken), str(shapes_folder))
    assert result.returncode == 2 and f"{broken}: imgcls metadata is not valid JSON" in result.stderr
    assert "Traceback" not in result.stderr

    newer = doctored_checkpoint(
        tiny_checkpoint, tmp_path / "newer.safetensors", lambda m: m.update(version=9)
    )
    result = cli("export", str(newer), "-f", "torchscript", "--out", str(tmp_path / "m.pt"))
    assert result.returncode == 2 and "checkpoint format version 9 is newer" in result.stderr
    assert not (tmp_path / "m.pt").exists()

    onnx_bad = doctored_onnx(
        exports["onnx"], tmp_path / "bad.onnx", lambda m: m["preprocessing"].update(std=[1, 0, 1])
    )
    result = cli("predict", str(image), "--model", str(onnx_bad))
    assert result.returncode == 2 and f"{onnx_bad}: preprocessing.std[1]: 0 is not positive" in result.stderr
