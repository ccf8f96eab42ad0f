"""Recipes: parsed once, strictly, with errors that name file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgcls.errors import RecipeError
from imgcls.recipe import load_recipe, parse_shape, recipe_from_dict, recipe_to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def error(path: Path, *overrides: str) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return str(info.value)


def test_scientific_notation_is_a_float(tmp_path):
    recipe = load_recipe(
        write(tmp_path, "model: {arch: resnet18}\ntrain:\n  optimizer: {lr: 1e-3, weight_decay: 5E-4}\n")
    )
    assert recipe.train.optimizer.lr == 0.001 and isinstance(recipe.train.optimizer.lr, float)
    assert recipe.train.optimizer.weight_decay == 0.0005


def test_unknown_key_gets_a_hint_with_its_line(tmp_path):
    path = write(tmp_path, "model:\n  layers:\n    - flatten\n    - dense: {unit: 10}\n")
    assert error(path).startswith(
        f"{path}:4 model.layers[1].dense.unit: unknown key 'unit'; did you mean 'units'?"
    )


def test_unknown_section_and_layer_kind(tmp_path):
    assert "did you mean 'train'?" in error(write(tmp_path, "model: {arch: vgg16}\ntrian: {}\n"))
    message = error(write(tmp_path, "model:\n  layers:\n    - conv2d: {filters: 3}\n"))
    assert ":3 model.layers[0].conv2d: unknown key 'conv2d'; did you mean 'conv'?" in message


def test_bad_value_and_bad_choice(tmp_path):
    path = write(tmp_path, "model:\n  layers:\n    - conv: {filters: 8, padding: sam}\n")
    assert "model.layers[0].conv.padding: unknown value 'sam'; did you mean 'same'?" in error(path)
    path = write(tmp_path, "model: {arch: vgg16}\ntrain:\n  batch_size: 0\n")
    assert error(path).startswith(f"{path}:3 train.batch_size: Input should be greater than 0")


def test_duplicate_keys_are_errors(tmp_path):
    path = write(tmp_path, "model: {arch: vgg16}\ntrain:\n  epochs: 3\n  epochs: 4\n")
    assert error(path) == f"{path}:4 train.epochs: duplicate key (first given on line 3)"


def test_unsafe_yaml_is_refused(tmp_path):
    path = write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    assert "invalid YAML" in error(path)


def test_model_needs_exactly_one_of_arch_and_layers(tmp_path):
    assert "either 'arch'" in error(write(tmp_path, "model: {}\n"))
    assert "either 'arch'" in error(write(tmp_path, "model: {arch: vgg16, layers: [flatten]}\n"))


def test_shorthands():
    recipe = recipe_from_dict(
        {
            "model": {
                "layers": [{"conv": 8}, {"maxpool": 2}, "relu", "flatten", {"dropout": 0.3}, {"dense": 10}]
            },
            "train": {"optimizer": "sgd", "schedule": "cosine", "ema": 0.99, "early_stopping": 3},
            "data": {"augment": {"random_crop": 4, "hflip": True}},
        }
    )
    kinds = [layer.kind for layer in recipe.model.layers]
    assert kinds == ["conv", "maxpool", "activation", "flatten", "dropout", "dense"]
    assert recipe.model.layers[0].spec.filters == 8 and recipe.model.layers[5].spec.units == 10
    assert recipe.train.optimizer.name == "sgd" and recipe.train.schedule.name == "cosine"
    assert recipe.train.ema.decay == 0.99 and recipe.train.early_stopping.patience == 3
    assert recipe.data.augment.random_crop.padding == 4


def test_overrides_with_dotted_paths_and_indexes(tmp_path):
    path = ROOT / "recipes" / "quickstart.yaml"
    recipe = load_recipe(
        path, ["train.epochs=3", "data.path=~/pets", "data.source=folder", "model.layers[0].conv.filters=32"]
    )
    assert recipe.train.epochs == 3 and recipe.data.path == "~/pets"
    assert recipe.model.layers[0].spec.filters == 32
    assert error(path, "train.epochs=many").startswith("--set train.epochs: train.epochs:")
    assert "does not exist" in error(path, "model.layers[99].conv.filters=3")
    assert "expected key=value" in error(path, "train.epochs")


def test_name_defaults_to_the_file_stem(tmp_path):
    path = tmp_path / "my cats.yaml"
    path.write_text("model: {arch: resnet18}\n")
    assert load_recipe(path).name == "my-cats"


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_load_and_round_trip(path):
    recipe = load_recipe(path)
    assert recipe_from_dict(recipe_to_dict(recipe)) == recipe


def test_parse_shape():
    assert parse_shape("3x224x224") == (3, 224, 224)
    assert parse_shape("64x64") == (3, 64, 64)
    with pytest.raises(ValueError):
        parse_shape("3x0x4")


def test_switches_and_numbers_in_the_wrong_place():
    recipe = recipe_from_dict({"model": {"arch": "vgg16"}, "train": {"ema": False, "early_stopping": False}})
    assert recipe.train.ema is None and recipe.train.early_stopping is None
    assert recipe_from_dict({"model": {"arch": "vgg16"}, "train": {"ema": True}}).train.ema.decay == 0.999
    with pytest.raises(RecipeError, match="data.augment.color_jitter: give a mapping"):
        recipe_from_dict({"model": {"arch": "vgg16"}, "data": {"augment": {"color_jitter": 0.4}}})


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("train:\n  epochs", "true", "not true"),
        ("train:\n  epochs", "2.5", "not 2.5"),
        ("train:\n  epochs", "'3'", "not '3' (a string)"),
        ("train:\n  batch_size", "false", "not false"),
        ("train:\n  seed", "1.0", "not 1.0"),
        ("data:\n  image_size", "[32, true]", "not [32, true]"),
        ("data:\n  channels", "true", "not true"),
        ("data:\n  augment:\n    random_crop", "{padding: 2.5}", "not 2.5"),
        ("data:\n  augment:\n    hflip", "'yes'", "not 'yes' (a string)"),
        ("train:\n  optimizer:\n    lr", "'1e-3'", "not '1e-3' (a string)"),
    ],
)
def test_no_coercion_into_ints_bools_or_floats(tmp_path, key, value, shown):
    """`epochs: true` used to train one epoch, `epochs: 2.5` two."""
    line = key.count("\n") + 2
    path = write(tmp_path, f"model: {{arch: resnet18}}\n{key}: {value}\n")
    message = error(path)
    assert message.startswith(f"{path}:{line} ") and shown in message, message


def test_ints_are_still_fine_where_a_float_is_asked_for(tmp_path):
    recipe = load_recipe(
        write(tmp_path, "model: {arch: resnet18}\ntrain:\n  optimizer: {lr: 1, momentum: 0}\n")
    )
    assert recipe.train.optimizer.lr == 1.0 and recipe.train.optimizer.momentum == 0.0


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", ".NaN"])
@pytest.mark.parametrize("key", ["optimizer:\n    lr", "label_smoothing", "grad_clip"])
def test_infinite_and_nan_floats_are_recipe_errors(tmp_path, key, value):
    line = key.count("\n") + 3
    path = write(tmp_path, f"model: {{arch: resnet18}}\ntrain:\n  {key}: {value}\n")
    message = error(path)
    assert message.startswith(f"{path}:{line} train.") and "finite number" in message, message


def test_nan_in_a_list_and_in_an_override(tmp_path):
    path = write(tmp_path, "model: {arch: resnet18}\ndata:\n  mean: [0.5, .nan, 0.5]\n")
    assert error(path).startswith(f"{path}:3 data.mean[1]: Input should be a finite number")
    ok = write(tmp_path, "model: {arch: resnet18}\n")
    assert error(ok, "train.optimizer.lr=.inf").startswith("--set train.optimizer.lr:")


def test_yaml_syntax_errors_give_line_and_column_of_the_problem(tmp_path):
    path = write(tmp_path, "name: x\nmodel:\n  layers:\n    - conv: {filters: 8, kernel: 3\n    - flatten\n")
    message = error(path)
    # PyYAML's problem mark, with the column, and where the unclosed mapping began
    assert message.startswith(f"{path}:6:1: invalid YAML:"), message
    assert "line 4, column 13" in message
    path = write(tmp_path, "name: x\nmodel: {arch: resnet18}\ntrain:\n  epochs: [1\n")
    assert error(path).startswith(f"{path}:5:1: invalid YAML:")
    path = write(tmp_path, "name: x\n  bad: 1\n")
    assert error(path).startswith(f"{path}:2:6: invalid YAML:")
