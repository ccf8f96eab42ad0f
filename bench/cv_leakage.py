"""Grouped against ungrouped cross-validation on digits with planted near-duplicates.

scikit-learn's digits (bundled, nothing downloaded): PER_CLASS images of each
digit, each written with COPIES slightly noisy copies in its own sub-folder
(``d3/g0042/0.png`` ...), as photo sets hold bursts and re-saves of one
scene (the PER_CLASS are drawn at random from each digit's images).
``imgcls cv --folds K`` with and without ``--group-by-folder 1``; each
fold's model is also scored on UNSEEN digits that are in no fold (the truth
the cross-validation estimates). Prints a Markdown table.

    python bench/cv_leakage.py [--per-class 20] [--copies 5] [--folds 5] [--epochs 10] [--seeds 3]

The run folders go to a temporary folder (or --out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from datasets import digits_arrays, write_digits  # noqa: E402

RECIPE = {
    "name": "digits-dup",
    "data": {"source": "folder", "path": "dup", "image_size": 8, "channels": 1},
    "model": {
        "layers": [
            {"conv": {"filters": 16, "kernel": 3, "padding": "same", "activation": "relu"}},
            {"maxpool": 2},
            {"conv": {"filters": 32, "kernel": 3, "padding": "same", "activation": "relu"}},
            "flatten",
        ]
    },
    "train": {"epochs": 10, "batch_size": 32, "optimizer": {"name": "adam", "lr": 3e-3}, "threads": 1},
}


def write_sets(root: Path, per_class: int, copies: int) -> tuple[Path, Path]:
    """``root/dup`` (the near-duplicate groups) and ``root/unseen`` (every other digit)."""
    images, labels = digits_arrays(8)
    rng = np.random.default_rng(0)
    used = []
    for c in range(10):  # drawn from the whole set: the same writers as the unseen digits
        for i in sorted(rng.choice(np.flatnonzero(labels == c), per_class, replace=False)):
            used.append(i)
            folder = root / "dup" / f"d{c}" / f"g{i:04d}"
            folder.mkdir(parents=True)
            for j in range(copies):
                noisy = images[i].astype(np.int16) + rng.integers(-12, 13, images[i].shape)
                Image.fromarray(noisy.clip(0, 255).astype(np.uint8), mode="L").save(folder / f"{j}.png")
    unseen = sorted(set(range(len(labels))) - set(used))
    write_digits(root / "unseen", 8, unseen)
    return root / "dup", root / "unseen"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--copies", type=int, default=5)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from imgcls import cv
    from imgcls.evaluate import evaluate
    from imgcls.recipe import recipe_from_dict

    root = args.out or Path(tempfile.mkdtemp(prefix="cv-leakage-"))
    _, unseen = write_sets(root, args.per_class, args.copies)
    quiet = lambda message: None  # noqa: E731
    results: dict[str, list[tuple[float, float]]] = {"ungrouped": [], "grouped (--group-by-folder 1)": []}
    for seed in range(args.seeds):
        for mode in results:
            raw = {**RECIPE, "data": {**RECIPE["data"], "split_seed": seed}}
            raw["train"] = {**RECIPE["train"], "epochs": args.epochs, "seed": seed, "out": str(root / "runs")}
            started = time.perf_counter()
            plan = cv.start(
                recipe_from_dict(raw),
                base_dir=root,
                folds=args.folds,
                group_by_folder=1 if mode.startswith("grouped") else None,
                log=quiet,
            )
            doc = cv.run(plan, log=quiet)
            truth = [
                evaluate(
                    plan.fold_dir(r["fold"]), unseen, out=root / "eval" / plan.parent.name, log=quiet
                ).report["accuracy"]
                for r in doc["runs"]
            ]
            s = doc["summary"]["val_acc"]
            results[mode].append((s["mean"], statistics.fmean(truth)))
            print(
                f"seed {seed} {mode}: cv val_acc {s['mean']:.4f} ± {s['std']:.4f}, "
                f"the same models on unseen digits {statistics.fmean(truth):.4f} "
                f"({time.perf_counter() - started:.0f} s) {plan.parent}",
                file=sys.stderr,
            )
    (root / "cv_leakage.yaml").write_text(
        yaml.safe_dump({k: [list(v) for v in r] for k, r in results.items()})
    )
    print(
        f"\n{args.per_class} digits per class x {args.copies} near-copies, {args.folds} folds, "
        f"{args.epochs} epochs, {args.seeds} seeds (split_seed = train.seed = 0..{args.seeds - 1})\n"
    )
    print("| folds | cv estimate: val_acc, mean of folds | same models on unseen digits | over-estimate |")
    print("|---|---|---|---|")
    for mode, rows in results.items():
        est = [r[0] for r in rows]
        true = [r[1] for r in rows]
        gap = [a - b for a, b in rows]
        print(
            f"| {mode} | {statistics.fmean(est):.3f} ± {_sd(est):.3f} | {statistics.fmean(true):.3f} ± {_sd(true):.3f} "
            f"| {statistics.fmean(gap):+.3f} |"
        )


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


if __name__ == "__main__":
    main()
