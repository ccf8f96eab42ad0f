"""Disk streaming against the in-RAM cache, with a cache larger than the memory the process may use.

    python bench/batch_sources.py [--gib 6] [--limit-gib 5] [--batch 256] [--size 224]

Writes a cache file of ``--gib`` GiB of uint8 rows (3 x size x size, the
decoded-cache layout), drops it from the page cache, then in child processes
draws one epoch of batches (the trainer's epoch order) through:

- ``stream``: imgcls.data.batches in stream mode, under ``prlimit --as``
  of ``--limit-gib`` GiB (address space, smaller than the cache: the process
  could not even map it, let alone hold it);
- ``ram``: the whole file read into memory first (no limit), batches gathered
  from it (what a machine with enough RAM does).

Prints img/s of the data path, peak RSS of each, and the ratio stream / ram.
The first figure for ``ram`` excludes its load time (printed apart).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(mode: str, file: str, n: int, size: int, batch: int) -> None:
    import numpy as np
    import torch

    from imgcls.data import batches

    shape = (n, 3, size, size)
    y = torch.zeros(n, dtype=torch.int64)
    cpu = torch.device("cpu")
    load = 0.0
    if mode == "ram":
        t0 = time.perf_counter()
        x = torch.from_numpy(np.fromfile(file, dtype=np.uint8).reshape(shape))
        load = time.perf_counter() - t0
        source = batches.open_batches(x, y, cpu, max_batch=batch, mode="device")
    else:
        source = batches.StreamBatches(file, shape, y, cpu, batch, batches.stream_budget())
    order = batches.epoch_order(n, 3 * size * size, torch.Generator().manual_seed(0))
    checksum = 0
    t0 = time.perf_counter()
    for i in range(0, n - batch + 1, batch):
        xb, _ = source.batch(order[i : i + batch])
        checksum += int(xb[:, 0, 0, 0].sum())  # touch the batch
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "mode": mode,
                "img_per_s": (n // batch) * batch / seconds,
                "peak_rss": rss,
                "load_s": load,
                "reads": getattr(source, "reads", 0),
                "checksum": checksum,
            }
        )
    )


def drop_page_cache(file: str) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--gib", type=float, default=6.0)
    p.add_argument("--limit-gib", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--child", nargs=2)
    a = p.parse_args()
    row = 3 * a.size * a.size
    n = int(a.gib * 1024**3) // row
    if a.child:
        child(a.child[0], a.child[1], n, a.size, a.batch)
        return
    file = os.path.join(a.dir, f"imgcls-bench-{n}x{row}.u8")
    if not os.path.exists(file) or os.path.getsize(file) != n * row:
        import numpy as np

        block = np.random.default_rng(0).integers(0, 256, (256, row), dtype=np.uint8)
        with open(file + ".tmp", "wb") as f:
            for i in range(0, n, 256):
                f.write(block[: min(256, n - i)].tobytes())
        os.replace(file + ".tmp", file)
    print(
        f"cache file: {n} rows of 3x{a.size}x{a.size} = {n * row / 1024**3:.2f} GiB; limit {a.limit_gib} GiB"
    )
    results = {}
    for mode in ("stream", "ram"):
        drop_page_cache(file)
        cmd = [sys.executable, __file__, "--gib", str(a.gib), "--batch", str(a.batch), "--size", str(a.size)]
        cmd += ["--child", mode, file]
        if mode == "stream":
            cmd = ["prlimit", f"--as={int(a.limit_gib * 1024**3)}", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        if out.returncode:
            print(f"{mode}: failed: {out.stderr.strip().splitlines()[-1:]}")
            continue
        results[mode] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{mode:6s} {r['img_per_s']:9.0f} img/s  peak RSS {r['peak_rss'] / 1024**3:5.2f} GiB"
            + (f"  (load {r['load_s']:.1f} s first)" if mode == "ram" else f"  ({r['reads']} reads)")
        )
    if len(results) == 2:
        s, r = results["stream"], results["ram"]
        assert s["checksum"] == r["checksum"], "the two sources gave different batches"
        print(
            f"stream / ram: throughput {s['img_per_s'] / r['img_per_s']:.2f}, peak RSS {s['peak_rss'] / r['peak_rss']:.2f}"
        )


if __name__ == "__main__":
    main()
