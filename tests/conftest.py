"""Shared fixtures: tiny generated data and checkpoints, never the network."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY_RECIPE = {
    "name": "tiny",
    "data": {
        "source": "shapes",
        "image_size": 16,
        "shapes": {"classes": ["circle", "square", "triangle"], "per_class": 8, "image_size": 16},
    },
    "model": {
        "layers": [
            {"conv": {"filters": 4, "kernel": 3, "padding": "same", "activation": "relu"}},
            {"maxpool": 2},
            {"conv": {"filters": 8, "kernel": 3, "padding": "same", "activation": "relu"}},
            "global_avg_pool",
        ]
    },
    "train": {"epochs": 1, "batch_size": 8},
}


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Built-in data goes to a temporary cache, not the user's ~/.cache."""
    os.environ["IMGCLS_CACHE"] = str(tmp_path_factory.mktemp("imgcls-cache"))
    yield


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """An ImageFolder of PNGs: 3 classes x 8 images, 16x16."""
    from imgcls.data.shapes import write_shapes
    from imgcls.recipe import ShapesSpec

    out = tmp_path_factory.mktemp("shapes") / "shapes"
    return write_shapes(out, ShapesSpec(classes=["circle", "square", "triangle"], per_class=8, image_size=16))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained but complete checkpoint for TINY_RECIPE (3 classes, 3x16x16)."""
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.models.build import build_model
    from imgcls.recipe import recipe_from_dict, recipe_to_dict

    recipe = recipe_from_dict(TINY_RECIPE)
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.input_shape(), 3)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(
        path,
        model,
        {
            "recipe": recipe_to_dict(recipe),
            "classes": ["circle", "square", "triangle"],
            "input_shape": [3, 16, 16],
            "preprocessing": {
                "image_size": [16, 16],
                "channels": 3,
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
                "resize": "stretch",
            },
            "epoch": 0,
        },
    )
    return path


def run_cli(
    *args: str, input: str | None = None, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real command in a child process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "imgcls", *args],
        capture_output=True,
        text=True,
        input=input,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


@pytest.fixture
def cli():
    return run_cli
