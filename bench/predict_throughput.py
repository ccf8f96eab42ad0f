"""Images/s of `imgcls predict`'s path against a plain PIL + torchvision loop.

Writes 512 JPEGs (64x64, built-in shapes) to a temp folder, builds a small
untrained checkpoint, then times, in the same process:

- ours: predict_files (safe decode on a thread pool one batch ahead, batched forward);
- plain, batch 1: PIL open -> transforms -> model, one image at a time;
- plain, batched: the same, stacked into batches of 64 (a typical script).

    python bench/predict_throughput.py [--images 512] [--size 64] [--repeat 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image


def make_jpegs(out: Path, n: int, size: int) -> list[Path]:
    from imgcls.data.shapes import write_shapes
    from imgcls.recipe import ShapesSpec

    classes = ["circle", "square", "triangle"]
    png = write_shapes(
        out / "png", ShapesSpec(classes=classes, per_class=-(-n // len(classes)), image_size=size)
    )
    files = []
    for p in sorted(png.rglob("*.png"))[:n]:
        dst = out / "jpg" / p.parent.name / (p.stem + ".jpg")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.open(p).convert("RGB").save(dst, quality=90)
        files.append(dst)
    return files


def make_checkpoint(path: Path, size: int) -> None:
    from imgcls.checkpoint import save_checkpoint
    from imgcls.models.build import build_model
    from imgcls.recipe import recipe_from_dict, recipe_to_dict

    recipe = recipe_from_dict(
        {
            "name": "bench",
            "data": {"image_size": size},
            "model": {
                "layers": [
                    {"conv": {"filters": 16, "kernel": 3, "padding": "same", "activation": "relu"}},
                    {"maxpool": 2},
                    {"conv": {"filters": 32, "kernel": 3, "padding": "same", "activation": "relu"}},
                    {"maxpool": 2},
                    {"conv": {"filters": 64, "kernel": 3, "padding": "same", "activation": "relu"}},
                    "global_avg_pool",
                ]
            },
        }
    )
    torch.manual_seed(0)
    model = build_model(recipe.model, recipe.input_shape(), 3)
    pre = {
        "image_size": [size, size],
        "channels": 3,
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "resize": "stretch",
    }
    meta = {
        "recipe": recipe_to_dict(recipe),
        "classes": ["circle", "square", "triangle"],
        "input_shape": [3, size, size],
        "preprocessing": pre,
    }
    save_checkpoint(path, model, meta)


def best_rates(fns: dict, n: int, repeat: int) -> dict[str, float]:
    """Best of ``repeat`` rounds; rounds interleave the contenders so they share any load."""
    for fn in fns.values():
        fn()  # warm-up
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    return {name: n / t for name, t in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    from torchvision import transforms

    from imgcls.predict import load_predictor, predict_files

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_jpegs(tmp, args.images, args.size)
        make_checkpoint(tmp / "bench.safetensors", args.size)
        predictor = load_predictor(tmp / "bench.safetensors", log=lambda m: None)
        model = load_predictor(tmp / "bench.safetensors", log=lambda m: None).forward
        tf = transforms.Compose(
            [
                transforms.Resize((args.size, args.size)),
                transforms.ToTensor(),
                transforms.Normalize([0.5] * 3, [0.25] * 3),
            ]
        )

        def ours() -> None:
            for _ in predict_files(predictor, files, batch_size=64):
                pass

        @torch.inference_mode()
        def plain_one() -> None:
            for f in files:
                x = tf(Image.open(f).convert("RGB"))[None]
                torch.softmax(model(x), 1).topk(3)

        @torch.inference_mode()
        def plain_batched() -> None:
            for i in range(0, len(files), 64):
                x = torch.stack([tf(Image.open(f).convert("RGB")) for f in files[i : i + 64]])
                torch.softmax(model(x), 1).topk(3)

        n = len(files)
        print(f"{n} JPEGs {args.size}x{args.size}, torch threads {torch.get_num_threads()}")
        contenders = {"ours": ours, "plain batch 1": plain_one, "plain batch 64": plain_batched}
        rates = best_rates(contenders, n, args.repeat)
        for name, rate in rates.items():
            print(f"{name:>15}: {rate:8.0f} images/s  (ours is {rates['ours'] / rate:.2f}x)")


if __name__ == "__main__":
    main()
