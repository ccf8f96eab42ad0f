"""How long `imgcls --help` and `imgcls predict` take, as multiples of starting Python itself.

    python bench/cli_startup.py [--runs 7]

DESIGN promises a thin CLI whose heavy imports (torch, torchvision) happen
inside the commands, so `--help` should cost a small multiple of `python -c
pass` (a few tens of ms), not the ~1.5 s of importing torch. `predict` on one
image with a tiny trained model (made once in a temporary folder) is the
start-up a script pays per call: torch, the checkpoint, one forward pass, and
none of the training stack. Prints the medians and their ratios; exits 1 if
a command fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        sys.exit(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}):\n  " + "\n  ".join(tail))
    return elapsed


TINY = """name: tiny
data: {source: shapes, image_size: 16, shapes: {classes: [circle, square], per_class: 8, image_size: 16}}
model: {layers: [{conv: {filters: 4, kernel: 3, padding: same, activation: relu}}, global_avg_pool]}
train: {epochs: 1, batch_size: 8, device: cpu}
"""


def tiny_model(folder: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """A run folder trained for one epoch on 16 px shapes, and one image to predict."""
    from PIL import Image

    recipe = folder / "tiny.yaml"
    recipe.write_text(TINY)
    wall([sys.executable, "-m", "imgcls", "train", str(recipe), "--out", str(folder / "run"), "-q"], env)
    photo = folder / "photo.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(photo)
    return folder / "run", photo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="repeats per command (median reported)")
    args = parser.parse_args()
    # run the working tree, installed or not
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    folder = Path(tempfile.mkdtemp(prefix="imgcls-startup-"))
    env["IMGCLS_CACHE"] = str(folder / "cache")  # the tiny run's decoded images stay here
    run, photo = tiny_model(folder, env)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "imgcls --help": [sys.executable, "-m", "imgcls", "--help"],
        "imgcls predict": [
            sys.executable,
            "-m",
            "imgcls",
            "predict",
            "--model",
            str(run),
            str(photo),
            "--json",
        ],
    }
    for cmd in commands.values():  # warm the file cache and .pyc files
        wall(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):  # interleaved, so drift hits both alike
        for name, cmd in commands.items():
            times[name].append(wall(cmd, env))
    base, cli, predict = (statistics.median(times[name]) for name in commands)
    print(f"python -c pass : {base * 1000:7.1f} ms (median of {args.runs})")
    print(f"imgcls --help  : {cli * 1000:7.1f} ms (median of {args.runs})")
    print(f"ratio          : {cli / base:7.2f}x")
    print(f"imgcls predict : {predict * 1000:7.1f} ms (median of {args.runs}; one image, a tiny model)")
    print(f"ratio          : {predict / base:7.2f}x")
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
