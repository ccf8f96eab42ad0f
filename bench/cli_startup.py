"""How long `imgcls --help` takes, as a multiple of starting Python itself.

    python bench/cli_startup.py [--runs 7]

DESIGN promises a thin CLI whose heavy imports (torch, torchvision) happen
inside the commands, so `--help` should cost a small multiple of `python -c
pass` (a few tens of ms), not the ~1.5 s of importing torch. Prints the medians
and their ratio; exits 1 if the command fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="repeats per command (median reported)")
    args = parser.parse_args()
    # run the working tree, installed or not
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "imgcls --help": [sys.executable, "-m", "imgcls", "--help"],
    }
    for cmd in commands.values():  # warm the file cache and .pyc files
        wall(cmd, env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(args.runs):  # interleaved, so drift hits both alike
        for name, cmd in commands.items():
            times[name].append(wall(cmd, env))
    base, cli = (statistics.median(times[name]) for name in commands)
    print(f"python -c pass : {base * 1000:7.1f} ms (median of {args.runs})")
    print(f"imgcls --help  : {cli * 1000:7.1f} ms (median of {args.runs})")
    print(f"ratio          : {cli / base:7.2f}x")


if __name__ == "__main__":
    main()
