"""What `imgcls summarize vgg16` costs next to torchinfo, in time and memory.

    python bench/summary_cost.py [--arch vgg16] [--runs 5] [--library]

Each measurement is a fresh child process, so imports count: wall time and
peak resident memory (the child's own ``ru_maxrss`` from ``wait4``). torchinfo
builds vgg16 with real weights (138 M parameters, 553 MB, randomly
initialised) and runs a real forward pass; we build on the meta device and run
a shape-only pass. Reference lines: `import torch` and `import torch,
torchvision` alone, the floor both pay. Runs are interleaved; medians printed,
then our cost as a ratio of torchinfo's.

``--library`` measures ``summarize_target`` in place of the CLI command (for
use before the CLI exists).

    python bench/summary_cost.py --flop-counter [--runs 5]

compares our MAC counting with ``torch.utils.flop_counter.FlopCounterMode``
in one process, on meta models: the time of our whole measurement (hooks,
parameter counts, per-module MACs) against FlopCounterMode's forward pass with
its per-module breakdown, and the totals each gives (FLOPs / 2) next to
torchvision's published GFLOPS. The reason we keep our own counter is in
imgcls/summary.py's docstring; this is the measurement behind it.
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


def measure(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        tail = "\n  ".join(err.strip().splitlines()[-5:])
        hint = "" if "--library" in sys.argv else "\n(no CLI yet? try --library)"
        sys.exit(f"`{' '.join(cmd[1:])}` failed (exit {proc.returncode}):\n  {tail}{hint}")
    return elapsed, usage.ru_maxrss / 1024  # Linux reports KiB


FLOP_COUNTER_ARCHS = ("resnet50", "densenet121", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t")


def compare_flop_counter(runs: int) -> None:
    """Our counter against FlopCounterMode: time (medians) and totals, per arch."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torchvision
    from torch.utils.flop_counter import FlopCounterMode

    from imgcls.models.build import build_model
    from imgcls.recipe import ModelSpec
    from imgcls.summary import _measure, meta_init

    print(f"per arch: medians of {runs} runs, one process, meta device, batch 1")
    print(
        f"  {'arch':18s} {'ours s':>7s} {'flopcm s':>8s} {'ratio':>6s}  {'ours MACs':>15s} {'flops/2':>15s} {'published':>15s}"
    )
    ratios = []
    for arch in FLOP_COUNTER_ARCHS:
        weights = torchvision.models.get_model_weights(arch).DEFAULT
        size = weights.transforms().crop_size[0]
        shape = (3, size, size)
        with meta_init():
            model = build_model(ModelSpec(arch=arch), shape, 1000)
        model.to("meta").eval()
        x = torch.empty(1, *shape, device="meta")
        ours_t, fc_t = [], []
        for _ in range(runs):
            start = time.perf_counter()
            ours = _measure(model, shape, arch, 1000).total_macs
            ours_t.append(time.perf_counter() - start)
            start = time.perf_counter()
            counter = FlopCounterMode(depth=None, display=False)
            with torch.no_grad(), counter:
                model(x)
            counter.get_flop_counts()
            fc_t.append(time.perf_counter() - start)
        o, f = statistics.median(ours_t), statistics.median(fc_t)
        ratios.append(o / f)
        published = round(weights.meta["_ops"] * 1e9)
        print(
            f"  {arch:18s} {o:7.3f} {f:8.3f} {o / f:6.2f}  {ours:15,} {counter.get_total_flops() // 2:15,} {published:15,}"
        )
    print(f"ours / FlopCounterMode time, median over archs: {statistics.median(ratios):.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--runs", type=int, default=5, help="repeats per command (median reported)")
    parser.add_argument("--library", action="store_true", help="call summarize_target, not the CLI")
    parser.add_argument(
        "--flop-counter", action="store_true", help="compare our MAC counter with torch's FlopCounterMode"
    )
    args = parser.parse_args()
    if args.flop_counter:
        compare_flop_counter(args.runs)
        return
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    py = sys.executable
    if args.library:
        ours = [py, "-c", f"from imgcls.summary import summarize_target; summarize_target({args.arch!r})"]
    else:
        ours = [py, "-m", "imgcls", "summarize", args.arch]
    torchinfo = [
        py,
        "-c",
        f"import torchvision, torchinfo; torchinfo.summary(torchvision.models.{args.arch}(), (1, 3, 224, 224))",
    ]
    commands = {
        "import torch": [py, "-c", "import torch"],
        "import torch, torchvision": [py, "-c", "import torch, torchvision"],
        "imgcls summarize" if not args.library else "summarize_target()": ours,
        "torchinfo.summary": torchinfo,
    }
    for cmd in commands.values():  # warm caches; fail early
        measure(cmd, env)
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
    for _ in range(args.runs):
        for name, cmd in commands.items():
            results[name].append(measure(cmd, env))
    medians = {
        name: (statistics.median(t for t, _ in runs), statistics.median(m for _, m in runs))
        for name, runs in results.items()
    }
    print(f"{args.arch}, medians of {args.runs} runs, each a fresh process")
    for name, (seconds, mb) in medians.items():
        print(f"  {name:28s} {seconds:6.2f} s  {mb:8.1f} MB peak RSS")
    (ours_s, ours_mb), (ti_s, ti_mb) = list(medians.values())[2:]
    print(f"ours / torchinfo: time {ours_s / ti_s:.2f}x, peak RSS {ours_mb / ti_mb:.2f}x")
    floor_s, floor_mb = medians["import torch, torchvision"]
    print(
        f"ours / import torch, torchvision: time {ours_s / floor_s:.2f}x, peak RSS {ours_mb / floor_mb:.2f}x"
    )


if __name__ == "__main__":
    main()
