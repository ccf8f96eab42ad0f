"""Training throughput with several processes against one, measured in one run.

    python bench/scaling.py [recipe] [--epochs N] [--nproc 1,2] [--device cpu|cuda]

Runs ``imgcls train RECIPE`` once as a plain single process (the baseline),
then with ``--nproc N`` for each N (torch's elastic launcher, DDP; gloo on
CPU, nccl on CUDA), and prints the images/s of the last epoch as the trainer
measured it (start-up and data preparation excluded), the speed-up against
the single process and the scaling efficiency (speed-up / N). The global
batch is the recipe's in every run, so each process gets batch_size / N.

On CPU the N processes share the machine's cores (each gets cores / N
threads), so efficiency there says what gradient averaging and the per-step
agreement cost, not what more hardware buys. With CUDA present (and
``--device cuda``), N is capped at the number of GPUs: 1 vs N GPUs.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(
    recipe: Path, out: Path, epochs: int, device: str, nproc: int | None, threads: int | None = None
) -> float:
    cmd = [sys.executable, "-m", "imgcls", "train", str(recipe), "--epochs", str(epochs), "--quiet"]
    cmd += ["--device", device, "--out", str(out)]
    if nproc is not None:
        cmd += ["--nproc", str(nproc)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    with open(out / "metrics.csv") as f:
        return float(list(csv.DictReader(f))[-1]["img_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--nproc", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    counts = [int(n) for n in args.nproc.split(",")]
    if args.device == "cuda":
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not gpus:
            sys.exit("--device cuda: no CUDA GPU here")
        counts = sorted({min(n, gpus) for n in counts})
    recipe = Path(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        base = run(recipe, Path(tmp) / "single", args.epochs, args.device, None)
        print(f"{recipe.name} on {args.device}, {args.epochs} epochs, last epoch's img/s")
        print(f"{'processes':>10} {'img/s':>10} {'speed-up':>9} {'efficiency':>11}")
        print(f"{'1 (plain)':>10} {base:>10.0f} {1.0:>9.2f} {1.0:>11.2f}")
        cores = os.cpu_count() or 1
        for n in counts:
            rate = run(recipe, Path(tmp) / f"nproc{n}", args.epochs, args.device, n)
            print(f"{n:>10} {rate:>10.0f} {rate / base:>9.2f} {rate / base / n:>11.2f}")
            if args.device == "cpu" and n > 1 and cores // n >= 1:
                # --nproc gives each process cores / N threads: the same per-process
                # threads in one process separates process scaling from threading
                one = run(recipe, Path(tmp) / f"plain{n}", args.epochs, args.device, None, cores // n)
                label = f"1 ({cores // n} thr)"
                print(
                    f"{label:>10} {one:>10.0f} {one / base:>9.2f}   (N={n} vs this: {rate / one / n:.2f} efficiency)"
                )


if __name__ == "__main__":
    main()
