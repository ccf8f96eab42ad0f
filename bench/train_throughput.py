"""Training throughput of imgcls against baselines measured in the same run.

    python bench/train_throughput.py [recipe] [--epochs N] [--mode one|bf16|two|all] [--precision]

Prints images/s and ratios (machines here are noisy; only ratios within one
run mean anything):

- imgcls / hand loop: ``imgcls``'s trainer against a minimal PyTorch loop on
  the same model, optimizer and batch size with the data already in memory
  as normalised float tensors. The pipeline may cost at most 10% (>= 0.9),
  in every mode (``--mode``): ``one`` (one process, fp32), ``bf16`` (both
  under bf16 autocast), ``two`` (``imgcls train --nproc 2`` against a
  hand-written two-process DistributedDataParallel loop on gloo, each process
  with cores / 2 threads and half of every batch).
  Each round runs both once, back to back; the ratio printed is the median of
  the rounds' ratios (a burst of noise moves one round, not the median), with
  the best-of-rounds ratio beside it.
- imgcls / ImageFolder+DataLoader: against torchvision's ImageFolder and a
  DataLoader decoding the PNGs every epoch (the usual way).
- MFU: training FLOP/s (6 x forward MACs per image: forward, and twice that
  backward) over this machine's measured fp32 matmul FLOP/s.
- With --precision: fp32 vs bf16 autocast vs channels_last, each a ratio to
  fp32, on the recipe's model with the hand loop.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from imgcls.data import prepare_data  # noqa: E402
from imgcls.models.build import build_model  # noqa: E402
from imgcls.recipe import load_recipe  # noqa: E402
from imgcls.summary import summarize_model  # noqa: E402
from imgcls.training import train  # noqa: E402
from imgcls.training.schedule import make_optimizer  # noqa: E402


def matmul_flops(n: int = 2048, repeat: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    return 2 * n**3 * repeat / (time.perf_counter() - start)


def _rate(recipe, model, batches, epochs: int, dtype=torch.float32) -> float:
    """Train ``model`` on ``batches()`` (an iterable per epoch); images/s of the last epoch."""
    opt = make_optimizer(model, recipe.train.optimizer)
    rate = 0.0
    for _ in range(epochs):
        model.train()
        start, seen = time.perf_counter(), 0
        for xb, yb in batches():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = F.cross_entropy(model(xb).float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(yb)
        rate = seen / (time.perf_counter() - start)
    return rate


MODES = {  # mode -> (recipe overrides for imgcls, hand loop dtype, processes)
    "one": (["train.precision=fp32"], torch.float32, 1),
    "bf16": (["train.precision=bf16"], torch.bfloat16, 1),
    "two": (["train.precision=fp32"], torch.float32, 2),
}


def hand_loop(recipe, x, y, epochs: int, dtype=torch.float32, channels_last=False) -> float:
    """The minimal loop a person would write, on in-memory tensors."""
    torch.manual_seed(0)
    model = build_model(recipe.model, tuple(x.shape[1:]), int(y.max()) + 1)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    bs = recipe.train.batch_size

    def batches():
        perm = torch.randperm(len(y))
        for i in range(0, len(y) - bs + 1, bs):
            idx = perm[i : i + bs]
            yield x[idx], y[idx]

    return _rate(recipe, model, batches, epochs, dtype)


def _ddp_worker(rank, world, port, recipe, x, y, epochs, threads, rates) -> None:
    """One process of the hand-written DistributedDataParallel loop: every rank
    draws the same epoch order and takes its half of each global batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model(recipe.model, tuple(x.shape[1:]), int(y.max()) + 1))
    bs, epoch = recipe.train.batch_size, [0]

    def batches():
        epoch[0] += 1
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(epoch[0]))
        for i in range(0, len(y) - bs + 1, bs):
            idx = perm[i : i + bs][rank::world]
            yield x[idx], y[idx]

    rate = _rate(recipe, model, batches, epochs)
    if rank == 0:
        rates.put(rate * world)  # every rank sees as many images in the same time
    dist.destroy_process_group()


def hand_ddp_loop(recipe, x, y, epochs: int, world: int = 2) -> float:
    """The two-process loop a person would write: torch.multiprocessing, gloo, DDP."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ctx = mp.get_context("spawn")
    rates = ctx.SimpleQueue()
    threads = max(1, (os.cpu_count() or 1) // world)
    mp.spawn(_ddp_worker, args=(world, port, recipe, x, y, epochs, threads, rates), nprocs=world)
    return rates.get()


def imgcls_nproc(recipe_path: str, overrides: list[str], nproc: int) -> float:
    """``imgcls train --nproc N`` in a fresh process: its last epoch's img/s
    (measured by rank 0 over all ranks' images; start-up excluded)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "imgcls", "train", recipe_path, "--nproc", str(nproc)]
        cmd += [arg for o in overrides for arg in ("--set", o)] + ["--out", str(out), "--quiet"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
        with open(out / "metrics.csv") as f:
            return float(list(csv.DictReader(f))[-1]["img_per_s"])


def imagefolder_loop(recipe, folder: Path, epochs: int, mean, std) -> float:
    """torchvision ImageFolder + DataLoader, decoding PNGs every epoch."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    size = recipe.data.size
    tf = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(mean, std)])
    ds = ImageFolder(str(folder), transform=tf)
    loader = DataLoader(
        ds,
        batch_size=recipe.train.batch_size,
        shuffle=True,
        num_workers=2,
        drop_last=True,
        persistent_workers=True,
    )
    torch.manual_seed(0)
    model = build_model(recipe.model, (recipe.data.channels, *size), len(ds.classes))
    return _rate(recipe, model, lambda: loader, epochs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("recipe", nargs="?", default=str(ROOT / "recipes" / "quickstart.yaml"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--precision", action="store_true", help="also compare fp32 / bf16 / channels_last")
    parser.add_argument("--no-imagefolder", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--mode", choices=[*MODES, "all"], default="one")
    args = parser.parse_args()

    base = [f"train.epochs={args.epochs}", "train.channels_last=false"]
    recipe = load_recipe(args.recipe, [*base, "train.precision=fp32"])
    data = prepare_data(recipe.data, Path(args.recipe).parent, None)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)
    x = (data.train.x.float() / 255 - mean) / std
    y = data.train.y
    print(
        f"recipe {args.recipe}: {len(y)} training images {tuple(x.shape[1:])}, batch {recipe.train.batch_size}, torch threads {torch.get_num_threads()}"
    )

    def ours_once(r) -> float:
        with tempfile.TemporaryDirectory() as tmp:
            result = train(r, out=Path(tmp) / "run", log=lambda m: None)
        return result.history[-1]["img_per_s"]

    ours = 0.0
    for mode in MODES if args.mode == "all" else [args.mode]:
        overrides, dtype, nproc = MODES[mode]
        r = load_recipe(args.recipe, [*base, *overrides])
        # rounds of both back to back: a noisy moment moves one round's ratio, not the median
        mines, hands = [], []
        for _ in range(args.rounds):
            if nproc == 1:
                mines.append(ours_once(r))
                hands.append(hand_loop(r, x, y, args.epochs, dtype=dtype))
            else:
                mines.append(imgcls_nproc(args.recipe, [*base, *overrides], nproc))
                hands.append(hand_ddp_loop(r, x, y, args.epochs, world=nproc))
        ratio = statistics.median(m / h for m, h in zip(mines, hands, strict=True))
        ours = ours or max(mines)
        print(f"[{mode}] imgcls train        {max(mines):8.0f} img/s  (best of {args.rounds})")
        print(f"[{mode}] hand-written loop   {max(hands):8.0f} img/s")
        print(
            f"[{mode}] ratio imgcls / hand loop: {ratio:.3f}   (target >= 0.9; median of "
            f"{args.rounds} paired rounds; best/best {max(mines) / max(hands):.3f})"
        )

    if not args.no_imagefolder:
        folder = data.source.root if data.source is not None else None
        if folder is not None and recipe.data.source in ("shapes", "folder"):
            ifl = imagefolder_loop(recipe, Path(folder), args.epochs, data.mean, data.std)
            print(f"ImageFolder+DataLoader {ifl:8.0f} img/s  (decodes PNGs every epoch, 2 workers)")
            print(f"ratio imgcls / ImageFolder+DataLoader: {ours / ifl:.2f}")

    model = build_model(recipe.model, tuple(x.shape[1:]), len(data.classes))
    macs = summarize_model(model, tuple(x.shape[1:])).total_macs
    peak = matmul_flops()
    achieved = 6 * macs * ours
    print(
        f"forward MACs/image {macs:,}; training {achieved / 1e9:.1f} GFLOP/s; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s"
    )
    print(f"model FLOP utilisation (MFU): {achieved / peak:.3f}")

    if args.precision:
        base = hand_loop(recipe, x, y, args.epochs)
        bf16 = hand_loop(recipe, x, y, args.epochs, dtype=torch.bfloat16)
        cl = hand_loop(recipe, x, y, args.epochs, channels_last=True)
        cl_bf16 = hand_loop(recipe, x, y, args.epochs, dtype=torch.bfloat16, channels_last=True)
        print(
            f"fp32 {base:.0f} img/s; bf16/fp32 {bf16 / base:.2f}; channels_last/fp32 {cl / base:.2f}; bf16+channels_last/fp32 {cl_bf16 / base:.2f}"
        )


if __name__ == "__main__":
    main()
