"""Knowledge distillation on scikit-learn's digits: a small student taught by a
stronger teacher against the same student trained alone.

    python bench/distill_gain.py [--seeds 3] [--epochs 8] [--teacher-epochs 15] \
        [--temperature 4] [--alpha 0.5 0.9] [--train-fraction 1.0] [--out /tmp/distill-gain]

The digits (1,797 images, tests/datasets.py) are written as a folder of
16x16 grey PNGs; 20% are held out (data.split_seed 0) and every number below
is the accuracy on them at the LAST epoch (no checkpoint picked on them).
``--train-fraction F`` writes a seeded share F of the digits instead (20% of
it held out as above), for the few-labels case: teacher and students alike
see only those labels.

1. The teacher (a 4-conv CNN) trains once (seed 0).
2. The student (2 convs, under 1/10 of the teacher's MACs: both counted by
   imgcls.summary, as ``imgcls summarize`` prints them) trains alone, and
   distilled (``train.distill``) at each ``--alpha``, ``--seeds`` seeds each,
   the same epochs, learning rate and batches.

Prints the MACs, each run's accuracy and the mean (and spread) per variant,
and one JSON line at the end. Runs in this process on the CPU; nothing but
``--out`` is written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

TEACHER = [
    {"conv": {"filters": 32, "kernel": 3, "padding": "same", "activation": "relu", "batch_norm": True}},
    {"conv": {"filters": 64, "kernel": 3, "padding": "same", "activation": "relu", "batch_norm": True}},
    {"maxpool": 2},
    {"conv": {"filters": 64, "kernel": 3, "padding": "same", "activation": "relu", "batch_norm": True}},
    {"conv": {"filters": 128, "kernel": 3, "padding": "same", "activation": "relu", "batch_norm": True}},
    {"maxpool": 2},
    "global_avg_pool",
    {"dropout": 0.3},
]
STUDENT = [
    {"conv": {"filters": 8, "kernel": 3, "padding": "same", "activation": "relu"}},
    {"maxpool": 2},
    {"conv": {"filters": 16, "kernel": 3, "padding": "same", "activation": "relu"}},
    {"maxpool": 2},
    "flatten",
]


def recipe(name: str, layers: list, data: Path, out: Path, epochs: int, seed: int, **train) -> dict:
    return {
        "name": name,
        "data": {"source": "folder", "path": str(data), "image_size": 16, "channels": 1, "val_split": 0.2},
        "model": {"layers": layers},
        "train": {
            "epochs": epochs,
            "batch_size": 64,
            "optimizer": {"name": "adam", "lr": 3e-3},
            "schedule": "cosine",
            "seed": seed,
            "device": "cpu",
            "precision": "fp32",
            "out": str(out),
            **train,
        },
    }


def macs(raw: dict) -> int:
    from imgcls.models.build import build_model
    from imgcls.recipe import recipe_from_dict
    from imgcls.summary import summarize_model

    r = recipe_from_dict(raw)
    return summarize_model(
        build_model(r.model, r.input_shape(), 10), r.input_shape(), num_classes=10
    ).total_macs


def fit(raw: dict, out: Path) -> float:
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    result = train(recipe_from_dict(raw), out=out, log=lambda message: None)
    return float(result.history[-1]["val_acc"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--teacher-epochs", type=int, default=15)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.5, 0.9])
    ap.add_argument("--train-fraction", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/distill-gain"))
    args = ap.parse_args()

    from datasets import write_digits

    shutil.rmtree(args.out, ignore_errors=True)
    indices = None
    if args.train_fraction < 1:  # a seeded share of the digits; 20% of it held out as above
        import numpy as np

        n = 1797
        indices = np.random.default_rng(0).choice(n, round(n * args.train_fraction), replace=False)
    data = write_digits(args.out / "digits", size=16, indices=indices)
    runs = args.out / "runs"
    runs.mkdir(parents=True)
    teacher_raw = recipe("teacher", TEACHER, data, runs, args.teacher_epochs, 0)
    student_raw = recipe("student", STUDENT, data, runs, args.epochs, 0)
    t_macs, s_macs = macs(teacher_raw), macs(student_raw)
    print(f"MACs: teacher {t_macs:,}, student {s_macs:,} (1/{t_macs / s_macs:.0f})", flush=True)
    started = time.perf_counter()
    teacher_acc = fit(teacher_raw, runs / "teacher")
    print(f"teacher: val_acc {teacher_acc:.4f} ({time.perf_counter() - started:.0f} s)", flush=True)
    variants = {"alone": None, **{f"distilled alpha {a:g}": a for a in args.alpha}}
    results: dict[str, list[float]] = {}
    for name, alpha in variants.items():
        for seed in range(args.seeds):
            extra = {}
            if alpha is not None:
                extra["distill"] = {
                    "teacher": str(runs / "teacher"),
                    "temperature": args.temperature,
                    "alpha": alpha,
                }
            raw = recipe("student", STUDENT, data, runs, args.epochs, seed, **extra)
            acc = fit(raw, runs / f"{name.replace(' ', '-')}-{seed}")
            results.setdefault(name, []).append(acc)
            print(f"{name}, seed {seed}: val_acc {acc:.4f}", flush=True)
    alone = statistics.mean(results["alone"])
    print(f"\n{'student':<24} {'mean val_acc':>12} {'min-max':>15} {'gain':>8}")
    for name, accs in results.items():
        mean = statistics.mean(accs)
        print(f"{name:<24} {mean:>12.4f} {min(accs):>7.4f}-{max(accs):.4f} {mean - alone:>+8.4f}")
    print(f"teacher (seed 0)         {teacher_acc:>12.4f}")
    summary = {
        "teacher_macs": t_macs,
        "student_macs": s_macs,
        "teacher_val_acc": teacher_acc,
        "epochs": args.epochs,
        "temperature": args.temperature,
        "train_fraction": args.train_fraction,
        "students": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
