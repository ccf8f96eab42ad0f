"""imgcls explain: heatmaps that point at the object, and that catch a shortcut."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import shapes

SIZE = 24
MARK = 5  # side of the shortcut marker, in pixels


def _draw(kind: str, seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """A shape drawn by the built-in generator (its mask captured), repainted
    light on dark: the geometry is the generator's, the random colours are
    gone, so a small CNN learns it in a few epochs instead of a few minutes."""
    masks = []
    original = shapes._mask

    def capture(*args):
        m = original(*args)
        masks.append(np.asarray(m) > 127)
        return m

    shapes._mask = capture
    try:
        rng = np.random.default_rng([seed, shapes.KINDS.index(kind), index])
        shapes.draw_shape(kind, SIZE, rng)
    finally:
        shapes._mask = original
    mask = masks[0]
    noise = np.random.default_rng([seed, index]).normal(0, 8, (SIZE, SIZE, 3))
    img = np.where(mask[..., None], 220.0, 40.0) + noise
    return np.rint(img).clip(0, 255).astype(np.uint8), mask


def _conv(filters: int) -> dict:
    return {
        "conv": {"filters": filters, "kernel": 3, "padding": "same", "batch_norm": True, "activation": "relu"}
    }


def _recipe(root: Path, out: Path, epochs: int) -> dict:
    return {
        "name": "explain-test",
        "data": {"source": "folder", "path": str(root), "image_size": SIZE, "val_split": 0.2},
        "model": {
            "layers": [
                _conv(16),
                {"maxpool": 2},
                _conv(32),
                {"maxpool": 2},
                _conv(32),
                "global_avg_pool",
                {"dense": {"units": 3}},
            ]
        },
        "train": {
            "epochs": epochs,
            "batch_size": 32,
            "optimizer": {"name": "adamw", "lr": 1e-2},
            "schedule": "onecycle",
            "seed": 0,
            "device": "cpu",
            "out": str(out),
        },
    }


def _train(recipe: dict, out: Path) -> Path:
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    torch.set_num_threads(2)
    result = train(recipe_from_dict(recipe), out=out, log=lambda m: None)
    return result.run_dir


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A quickstart-like CNN trained for a few seconds, and held-out images with their masks."""
    root = tmp_path_factory.mktemp("explain-shapes")
    data = root / "data"
    held = root / "held"
    held.mkdir()
    kinds = ["circle", "cross", "triangle"]
    masks = {}
    for kind in kinds:
        (data / kind).mkdir(parents=True)
        for i in range(60):
            img, _ = _draw(kind, 0, i)
            Image.fromarray(img).save(data / kind / f"{kind}_{i:03d}.png")
        for i in range(6):
            img, mask = _draw(kind, 1, i)
            path = held / f"{kind}_{i}.png"
            Image.fromarray(img).save(path)
            masks[path] = (kind, mask)
    run = _train(_recipe(data, root / "runs", epochs=8), root / "run")
    return run, masks


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory):
    """Two classes of the same shape; only a bright corner marker tells them apart."""
    root = tmp_path_factory.mktemp("explain-shortcut")
    data = root / "data"
    held = root / "held"
    held.mkdir()

    def marked(img: np.ndarray) -> np.ndarray:
        img = img.copy()
        img[-MARK:, -MARK:] = (255, 0, 255)  # bottom-right corner
        return img

    for cls in ("marked", "plain"):
        (data / cls).mkdir(parents=True)
    for i in range(60):
        img, _ = _draw("circle", 2, i)
        target = "marked" if i % 2 == 0 else "plain"
        Image.fromarray(marked(img) if target == "marked" else img).save(data / target / f"{i:03d}.png")
    files = []
    for i in range(8):
        img, _ = _draw("circle", 3, i)
        files.append(held / f"m{i}.png")
        Image.fromarray(marked(img)).save(files[-1])
    recipe = _recipe(data, root / "runs", epochs=6)
    recipe["model"]["layers"][-1] = {"dense": {"units": 2}}
    run = _train(recipe, root / "run")
    return run, files


def _near_mask(mask: np.ndarray, x: int, y: int, tolerance: int = 2) -> bool:
    y0, y1 = max(0, y - tolerance), y + tolerance + 1
    x0, x1 = max(0, x - tolerance), x + tolerance + 1
    return bool(mask[y0:y1, x0:x1].any())


@pytest.mark.slow
def test_gradcam_peak_falls_inside_the_drawn_shape(shapes_run, tmp_path):
    from imgcls.checkpoint import load_checkpoint
    from imgcls.explain import explain

    run, masks = shapes_run
    result = explain(list(masks), load_checkpoint(run), out=tmp_path / "x")
    assert result.layer == "conv3"  # the last conv block, named as summarize names it
    inside = correct = 0
    for e in result.images:
        kind, mask = masks[Path(e.file)]
        correct += e.predicted == kind
        peak = e.targets[0]["peak"]
        inside += _near_mask(mask, peak["x"], peak["y"])
        assert Path(e.targets[0]["overlay"]).is_file()
    assert correct >= 0.6 * len(masks)  # the model learned the shapes
    assert inside >= 0.75 * len(masks), f"peak inside the shape on {inside} of {len(masks)}"


@pytest.mark.parametrize("method", ["gradcam++", "layercam"])
@pytest.mark.slow
def test_other_methods_also_point_at_the_shape(shapes_run, tmp_path, method):
    from imgcls.checkpoint import load_checkpoint
    from imgcls.explain import explain

    run, masks = shapes_run
    files = list(masks)[::2]
    result = explain(files, load_checkpoint(run), method=method, out=tmp_path / "x")
    inside = sum(
        _near_mask(masks[Path(e.file)][1], e.targets[0]["peak"]["x"], e.targets[0]["peak"]["y"])
        for e in result.images
    )
    assert inside >= 0.7 * len(files)


@pytest.mark.slow
def test_a_shortcut_is_caught_the_heatmap_peaks_at_the_marker(shortcut_run, tmp_path):
    from imgcls.checkpoint import load_checkpoint
    from imgcls.explain import explain

    run, files = shortcut_run
    result = explain(files, load_checkpoint(run), targets=["marked"], out=tmp_path / "x")
    at_marker = 0
    for e in result.images:
        peak = e.targets[0]["peak"]
        at_marker += peak["x"] >= SIZE - MARK - 3 and peak["y"] >= SIZE - MARK - 3
    assert at_marker >= 0.75 * len(files), f"peak at the marker on {at_marker} of {len(files)}"


def test_cli_json_overlays_filters_and_maps(tiny_checkpoint, shapes_folder, tmp_path, cli):
    files = [
        str(shapes_folder / "circle" / "circle_0000.png"),
        str(shapes_folder / "square" / "square_0001.png"),
    ]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    out = tmp_path / "out"
    r = cli(
        "explain", *files, str(bad), "--model", str(tiny_checkpoint), "--json", "--out", str(out),
        "--target", "circle", "--target", "square", "--filters", "--maps", "conv1",
    )  # fmt: skip
    assert r.returncode == 3, r.stderr  # one unreadable image: partial
    assert "bad.png" in r.stderr
    doc = json.loads(r.stdout)
    assert doc["layer"] == "conv2"  # the last conv before global pooling
    assert doc["skipped"][0]["file"] == str(bad)
    assert len(doc["images"]) == 2
    for image in doc["images"]:
        assert image["predicted"] in ("circle", "square", "triangle")
        assert 0 < image["probability"] <= 1
        assert [t["class"] for t in image["targets"]] == ["circle", "square"]
        for t in image["targets"]:
            assert 0 <= t["peak"]["x"] < 16 and 0 <= t["peak"]["y"] < 16
            assert 0 <= t["area_above_half_max"] <= 1
            assert Image.open(t["overlay"]).size[0] >= 256  # scaled up to be seen
        assert Path(image["maps"]).is_file()
    assert Path(doc["filters"]).is_file()


def test_usage_errors(tiny_checkpoint, shapes_folder, tmp_path):
    from imgcls.checkpoint import load_checkpoint
    from imgcls.errors import DataError, UsageError
    from imgcls.explain import explain

    ckpt = load_checkpoint(tiny_checkpoint)
    good = [shapes_folder / "circle" / "circle_0000.png"]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match="none of the 1 images"):
        explain([bad], ckpt, out=tmp_path / "o")
    with pytest.raises(UsageError, match="conv9: no such layer .did you mean"):
        explain(good, ckpt, layer="conv9", out=tmp_path / "o")
    with pytest.raises(UsageError, match="not a feature map"):
        explain(good, ckpt, layer="global_avg_pool1", out=tmp_path / "o")
    with pytest.raises(UsageError, match="hexagon: not one of the model's classes"):
        explain(good, ckpt, targets=["hexagon"], out=tmp_path / "o")
    with pytest.raises(UsageError, match="gradcam\\+\\+"):
        explain(good, ckpt, method="magic", out=tmp_path / "o")


@pytest.mark.slow
def test_torchvision_cnn_default_layer_and_transformer_refused():
    import torchvision

    from imgcls.errors import UsageError
    from imgcls.explain import class_maps, default_layer

    resnet = torchvision.models.resnet18(num_classes=3).eval()
    assert default_layer(resnet, (3, 64, 64)) == "layer4"
    cam, scores = class_maps(resnet, torch.randn(2, 3, 64, 64), "layer4", torch.tensor([0, 2]))
    assert cam.shape == (2, 64, 64) and scores.shape == (2, 3)
    assert float(cam.max()) <= 1.0 and float(cam.min()) >= 0.0

    with torch.device("meta"):  # shapes only: no 86M random weights to draw
        vit = torchvision.models.vit_b_16(image_size=32, num_classes=3).eval()
    with pytest.raises(UsageError, match="not supported for this architecture"):
        default_layer(vit, (3, 32, 32), "vit_b_16")


def test_error_gallery_rows_per_confused_pair(tiny_checkpoint, shapes_folder, tmp_path):
    from imgcls.checkpoint import load_checkpoint
    from imgcls.explain import write_error_gallery

    ckpt = load_checkpoint(tiny_checkpoint)
    wrong = [
        {"file": str(shapes_folder / "circle" / f"circle_000{i}.png"), "true": "circle", "predicted": "square",
         "confidence": 0.5 + i / 10}
        for i in range(3)
    ] + [{"file": str(shapes_folder / "square" / "square_0000.png"), "true": "square", "predicted": "triangle",
          "confidence": 0.4}]  # fmt: skip
    pairs = [{"true": "circle", "predicted": "square"}, {"true": "square", "predicted": "triangle"}]
    for heat in (False, True):
        png = write_error_gallery(tmp_path / f"errors-{heat}.png", ckpt, wrong, pairs, with_heatmaps=heat)
        w, h = Image.open(png).size
        assert h > 100 and w > h  # 2 rows of up to 3 pictures
    assert write_error_gallery(tmp_path / "none.png", ckpt, [], pairs) is None
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize("case", ["missing parent", "a file"])
def test_unusable_out_is_refused_before_the_work(tiny_checkpoint, shapes_folder, tmp_path, cli, case):
    """--out as train --out: a missing parent folder or a file is one line, exit 2,
    and nothing is drawn (no folder is created)."""
    (tmp_path / "file").write_text("x")
    out = {"missing parent": tmp_path / "no" / "such" / "out", "a file": tmp_path / "file"}[case]
    good = str(shapes_folder / "circle" / "circle_0000.png")
    r = cli("explain", good, "--model", str(tiny_checkpoint), "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert str(out) in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "no").exists() and (tmp_path / "file").read_text() == "x"
