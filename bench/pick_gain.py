"""Does `imgcls pick` find better images to label than chance? Active learning on the digits.

scikit-learn's digits (8x8, 1,797 images): a fixed test set of 500, the other
1,297 are the unlabelled pool. Each seed starts from the same 50 labels (5 per
digit, drawn by the seed); then 5 rounds: train a small CNN from scratch on the
labels so far, pick 50 more from the pool (``imgcls.pick.pick``, the code
behind ``imgcls pick``), "label" them (their true digit), and go on. Reported:
accuracy on the test set at each budget (50 .. 300 labels), mean of the
seeds, for random, margin and diverse picking, with label_smoothing 0 and 0.1.

    python bench/pick_gain.py                 # 3 seeds, ~16 min on a loaded 2-core machine
    python bench/pick_gain.py --seeds 1 --rounds 2 --smoothing 0   # a quick look
    python bench/pick_gain.py --smoothing 0 --strategies diverse --pool-factor 2

Not a test: it prints a table (and --json writes every number).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from datasets import digits_arrays  # noqa: E402  (tests/datasets.py)
from PIL import Image  # noqa: E402

START, STEP, TEST = 50, 50, 500
CNN = [
    {"conv": {"filters": 16, "kernel": 3, "padding": "same", "activation": "relu"}},
    {"maxpool": 2},
    {"conv": {"filters": 32, "kernel": 3, "padding": "same", "activation": "relu"}},
    "flatten",
]


def quiet(message: str) -> None:
    pass


def write_pool(root: Path) -> tuple[list[Path], np.ndarray, list[Path], np.ndarray]:
    """The digits as flat PNGs (no label in the path): pool files + labels, test files + labels."""
    images, labels = digits_arrays(size=8)
    order = np.random.default_rng(12345).permutation(len(labels))
    test_idx, pool_idx = order[:TEST], order[TEST:]
    files = []
    for i in range(len(labels)):
        path = root / "all" / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], mode="L").save(path)
        files.append(path)
    return [files[i] for i in pool_idx], labels[pool_idx], [files[i] for i in test_idx], labels[test_idx]


def train_on(files: list[Path], labels: np.ndarray, work: Path, seed: int, smoothing: float) -> Path:
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    data = work / "data"
    for f, y in zip(files, labels, strict=True):
        (data / f"d{y}").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, data / f"d{y}" / f.name)
    recipe = recipe_from_dict(
        {
            "name": "pick-gain",
            "data": {"source": "folder", "path": str(data), "channels": 1, "image_size": 8, "val_split": 0},
            "model": {"layers": CNN},
            "train": {
                "epochs": 30,
                "batch_size": 32,
                "optimizer": {"lr": 0.003},
                "label_smoothing": smoothing,
                "seed": seed,
                "threads": 1,
                "device": "cpu",
            },
        }
    )
    result = train(recipe, out=work / "run", log=quiet)
    return result.run_dir / "last.safetensors"


def accuracy(ckpt: Path, files: list[Path], labels: np.ndarray) -> float:
    from imgcls.predict import predict_files
    from imgcls.predictor import load_predictor

    predictor = load_predictor(ckpt, log=quiet)
    got = [r.label for r in predict_files(predictor, files, batch_size=256, top_k=1)]
    return float(np.mean([g == f"d{y}" for g, y in zip(got, labels, strict=True)]))


def curve(strategy, seed, smoothing, rounds, pool, pool_y, test, test_y, start_ckpt, start_acc, work):
    """Test accuracy at each budget: START labels, then STEP more per round, picked by ``strategy``."""
    from imgcls.pick import pick

    rng = np.random.default_rng(seed)
    labelled = initial(pool_y, seed)
    accs, ckpt = [start_acc], start_ckpt
    for r in range(1, rounds + 1):
        unlabelled = [str(pool[i]) for i in range(len(pool)) if i not in labelled]
        picked = pick(
            unlabelled, n=STEP, strategy=strategy, model=ckpt, seed=int(rng.integers(1 << 31)), log=quiet
        )
        index = {str(p): i for i, p in enumerate(pool)}
        labelled |= {index[p.file] for p in picked.picks}
        chosen = sorted(labelled)
        ckpt = train_on([pool[i] for i in chosen], pool_y[chosen], work / f"{strategy}-{r}", seed, smoothing)
        accs.append(accuracy(ckpt, test, test_y))
    return accs


def initial(pool_y: np.ndarray, seed: int) -> set[int]:
    """START labels, the same number per digit, drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    per = START // 10
    return {int(i) for k in range(10) for i in rng.permutation(np.flatnonzero(pool_y == k))[:per]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoothing", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--strategies", nargs="+", default=["random", "margin", "diverse"])
    parser.add_argument(
        "--pool-factor", type=int, help="diverse: k-center over this many times 50 (default: imgcls.pick's)"
    )
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args()
    if args.pool_factor:
        import imgcls.pick

        imgcls.pick.POOL_FACTOR = args.pool_factor
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["IMGCLS_CACHE"] = str(root / "cache")
        pool, pool_y, test, test_y = write_pool(root)
        results: dict = {}
        t0 = time.perf_counter()
        for smoothing in args.smoothing:
            for seed in range(args.seeds):
                work = root / f"ls{smoothing}-s{seed}"
                start = sorted(initial(pool_y, seed))
                ckpt = train_on([pool[i] for i in start], pool_y[start], work / "start", seed, smoothing)
                start_acc = accuracy(ckpt, test, test_y)
                for strategy in args.strategies:
                    accs = curve(
                        strategy,
                        seed,
                        smoothing,
                        args.rounds,
                        pool,
                        pool_y,
                        test,
                        test_y,
                        ckpt,
                        start_acc,
                        work,
                    )
                    results.setdefault(f"{smoothing}", {}).setdefault(strategy, []).append(accs)
                    print(
                        f"ls {smoothing} seed {seed} {strategy:8s} " + " ".join(f"{a:.3f}" for a in accs),
                        f"({time.perf_counter() - t0:.0f} s)",
                        flush=True,
                    )
        budgets = [START + STEP * r for r in range(args.rounds + 1)]
        print(f"\nmean test accuracy over {args.seeds} seeds ({TEST} test digits), by labels used")
        print("| label_smoothing | strategy | " + " | ".join(str(b) for b in budgets) + " |")
        print("|---|---|" + "---:|" * len(budgets))
        for smoothing, by in results.items():
            for strategy, runs in by.items():
                mean = np.mean(runs, axis=0)
                print(f"| {smoothing} | {strategy} | " + " | ".join(f"{m:.3f}" for m in mean) + " |")
        if args.json:
            args.json.write_text(json.dumps({"budgets": budgets, "accuracy": results}, indent=1))


if __name__ == "__main__":
    main()
