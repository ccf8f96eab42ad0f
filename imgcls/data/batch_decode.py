"""Decode many files into one uint8 array as fast as this machine allows.

:func:`decode_into` picks serial, threads or processes by measuring, on the
files at hand, at run time (CPUs and image sizes differ):

1. a serial probe (about :data:`PROBE_S`) gives the single-thread rate;
2. if the whole job at that rate is short (:data:`SERIAL_BELOW_S`), it stays
   serial: starting workers would cost more than it saves;
3. small images (above :data:`PYTHON_BOUND_RATE` on one thread: most of the
   time is Python code holding the GIL) go straight to processes;
4. else a short trial with one thread per core, work handed out in chunks:
   Pillow releases the GIL while it decodes and resizes, so large images
   (photos) scale with threads; if threads reach :data:`THREADS_GOOD` of
   single rate x cores, threads do the rest, else processes.

Processes take chunks from the parent, which decodes chunks too while the
pool starts and whenever enough are queued. When the destination is a cache
file being built, workers write their rows into it themselves (one pwrite
per chunk), so only failures and channel sums come back.

Processes use the ``spawn`` context (no fork after torch started its
threads) and import only PIL and numpy; they ignore SIGINT, so Ctrl-C reaches
the parent alone, which terminates the pool and re-raises. ``IMGCLS_DECODE``
(``serial``, ``threads``, ``processes``) overrides the measurement.

The pool is a :class:`DecodePool` its caller owns: nothing here is
process-global. As with any spawn or forkserver worker, each imports the
parent's ``__main__`` module as Python's multiprocessing does (a script that
calls imgcls needs the usual ``if __name__ == "__main__":`` guard); where that
module cannot be imported again (a script read from stdin), threads are used.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from imgcls import interrupts
from imgcls.data.decode import channel_sums, decode_chunk, decode_rows, decode_workers
from imgcls.data.progress import Task
from imgcls.errors import DataError, UsageError

MODES = ("auto", "serial", "threads", "processes")
PROBE_S = 0.15  # serial probe: long enough to time, short enough not to matter
SERIAL_BELOW_S = 1.0  # a job shorter than this at the serial rate stays serial
THREAD_TRIAL_S = 0.3  # the thread trial, at the ideal (serial x cores) rate
THREADS_GOOD = 0.8  # threads win when they reach this share of serial x cores
CHUNK_S = 0.1  # target seconds of work per chunk handed to a worker
# Above this single-thread rate (under 2 ms an image) decoding is mostly
# Python (Image.open of a small PNG is ~60 us of plugin code), which threads
# serialise on the GIL: go straight to processes, no thread trial.
PYTHON_BOUND_RATE = 500.0
SERIAL_CHUNK = 256
WARMUP = 4  # untimed images before the serial probe
PRESTART_MIN = 2000  # images from which the worker server is started before the probe
Log = Callable[[str], None]


def decode_mode() -> str:
    mode = os.environ.get("IMGCLS_DECODE", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UsageError(f"IMGCLS_DECODE={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def _usable_mode(mode: str) -> str:
    """``mode``, but threads where no worker process could start (see the module doc)."""
    return "threads" if mode in ("auto", "processes") and not main_importable() else mode


def decode_into(
    out,
    paths: Sequence[str | os.PathLike],
    channels: int,
    size: tuple[int, int],
    resize: Any,  # stretch, center_crop or pad (DataSpec.resize)
    workers: int | None = None,
    progress: Task | None = None,
    log: Log = lambda message: None,
    mode: str | None = None,
    *,
    file: tuple[str, int] | None = None,
    sums: np.ndarray | None = None,
    pool: DecodePool | None = None,
) -> list[tuple[int, str]]:
    """Decode ``paths[i]`` into ``out[i]`` (a uint8 numpy array or tensor of
    shape (N, C, H, W)); return the ``(index, reason)`` of files that failed.

    ``file``: ``(path, offset)`` of the file ``out`` maps (a cache being
    built): worker processes then write their rows there themselves.
    ``sums``: a (2, C) int64 array that receives the per-channel sum and sum
    of squares of the decoded rows (failed rows must be zero in ``out``).
    ``pool``: worker processes to use and keep (see :class:`DecodePool`);
    without one, any workers started end with this call.
    """
    if pool is None:
        with DecodePool() as own:
            args = (out, paths, channels, size, resize, workers, progress, log, mode)
            return decode_into(*args, file=file, sums=sums, pool=own)
    arr = out.numpy() if hasattr(out, "numpy") else out  # a tensor shares its memory
    paths = [os.fspath(p) for p in paths]
    n = len(paths)
    workers = workers or decode_workers()
    mode = _usable_mode(mode or decode_mode())
    failures: list[tuple[int, str]] = []
    total = np.zeros((2, channels), dtype=np.int64)

    def serial(a: int, b: int) -> None:
        for lo in range(a, b, SERIAL_CHUNK):  # chunks: a chunk's bytes stay in CPU cache
            hi = min(lo + SERIAL_CHUNK, b)
            failures.extend(
                (lo + i, r) for i, r in decode_rows(paths[lo:hi], arr[lo:hi], channels, size, resize)
            )
            total[...] += channel_sums(arr[lo:hi])
            if progress is not None:
                progress.advance(hi - lo)

    if mode in ("auto", "processes") and workers > 1 and n >= PRESTART_MIN:
        _prestart()  # the worker server imports while we probe
    # 1. serial probe, after a few untimed images: the first Image.open of a
    # process loads Pillow's plugins (~100 ms), which once made small PNGs
    # look like 94 images/s and sent them to GIL-bound threads
    done = min(n, WARMUP)
    serial(0, done)
    start = time.perf_counter()
    while done < n and (done < WARMUP + 16 or time.perf_counter() - start < PROBE_S):
        if mode in ("threads", "processes") and done >= WARMUP + 16:
            break
        step = min(16, n - done)
        serial(done, done + step)
        done += step
    rate1 = max(done - WARMUP, 1) / max(time.perf_counter() - start, 1e-9)
    left = n - done
    pool_ready = pool.ready(workers)  # kept from the previous split: no start cost
    short = left < rate1 * SERIAL_BELOW_S and not pool_ready
    if left and (mode == "serial" or workers == 1 or (mode == "auto" and short)):
        serial(done, n)
        left = 0
    chunk = int(np.clip(rate1 * CHUNK_S, 8, 1024))
    if left and mode == "auto" and rate1 >= PYTHON_BOUND_RATE:
        mode = "processes"
        log(f"decode: {rate1:,.0f} images/s on 1 thread (small images): the rest on {workers} processes")
    elif left and mode == "auto":
        # 2. thread trial, chunks of work per thread
        trial = min(left, max(2 * workers * chunk, int(rate1 * workers * THREAD_TRIAL_S)))
        t0 = time.perf_counter()
        _threads(
            arr, paths, done, done + trial, chunk, workers, channels, size, resize, failures, total, progress
        )
        rate_t = trial / max(time.perf_counter() - t0, 1e-9)
        done += trial
        left = n - done
        scaling = rate_t / (rate1 * workers)
        mode = (
            "threads" if scaling >= THREADS_GOOD or left / (rate1 * workers) < SERIAL_BELOW_S else "processes"
        )
        log(
            f"decode: {rate1:,.0f} images/s on 1 thread, {rate_t:,.0f}/s on {workers} threads "
            f"({scaling:.0%} of {workers} x 1 thread): the rest on {workers} {mode}"
        )
    if left and mode == "threads":
        _threads(arr, paths, done, n, chunk, workers, channels, size, resize, failures, total, progress)
    elif left:
        t0 = time.perf_counter()
        _processes(
            arr, paths, done, n, chunk, workers, channels, size, resize, failures, total, progress, file, pool
        )
        rate_p = left / max(time.perf_counter() - t0, 1e-9)
        log(
            f"decode: {rate_p:,.0f} images/s on {workers} processes and this one, pool start included "
            f"({rate_p / (rate1 * workers):.0%} of {workers} x 1 thread)"
        )
    if sums is not None:
        sums += total
    return sorted(failures)


def _threads(arr, paths, a, b, chunk, workers, channels, size, resize, failures, total, progress) -> None:
    """Threads over chunks (one future per chunk, not per image: per-image
    futures spend small images' time handing the GIL around)."""

    def run(lo: int, hi: int) -> tuple[int, list[tuple[int, str]], np.ndarray]:
        fails = [(lo + i, r) for i, r in decode_rows(paths[lo:hi], arr[lo:hi], channels, size, resize)]
        return hi - lo, fails, channel_sums(arr[lo:hi])

    step = max(1, min(chunk, (b - a + workers - 1) // workers))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="imgcls-decode")
    try:
        pending = {pool.submit(run, lo, min(lo + step, b)) for lo in range(a, b, step)}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                count, fails, part = f.result()
                failures.extend(fails)
                total[...] += part
                if progress is not None:
                    progress.advance(count)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _processes(
    arr, paths, a, b, chunk, workers, channels, size, resize, failures, total, progress, file, owner
) -> None:
    """A pool of ``workers`` spawn processes over chunks, and this process
    takes chunks too while the pool starts and whenever the pool has enough
    queued (on a 2-core machine the parent would otherwise sit idle, and
    spawning takes a few hundred ms). With ``file``, workers write their rows
    into it (one pwrite per chunk) instead of sending them back. ``owner``:
    the :class:`DecodePool` the workers come from (and stay in)."""
    row_shape = arr.shape[1:]
    row_bytes = int(np.prod(row_shape))
    todo = deque(range(a, b, chunk))

    def task(lo: int) -> tuple:
        hi = min(lo + chunk, b)
        target = None if file is None else (file[0], file[1] + lo * row_bytes)
        return lo, paths[lo:hi], channels, tuple(size), resize, target

    pool, warm = owner.get(workers)
    pending: set = set()
    queued = 2 * workers  # chunks in flight per pool: enough to never starve it

    def collect(finished) -> None:
        for f in finished:
            lo, data, fails, part = f.result()
            if data:
                rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, *row_shape)
                arr[lo : lo + len(rows)] = rows
            count = min(lo + chunk, b) - lo
            failures.extend((lo + i, r) for i, r in fails)
            total[...] += part
            if progress is not None:
                progress.advance(count)

    try:
        while todo or pending:
            with interrupts.postponed():  # workers start during submit
                while todo and len(pending) < queued:
                    pending.add(pool.submit(decode_chunk, task(todo.popleft())))
            if todo and not warm:  # the pool is starting: take a chunk here
                lo = todo.pop()  # from the end: the pool works from the front
                hi = min(lo + chunk, b)
                fails = decode_rows(paths[lo:hi], arr[lo:hi], channels, size, resize)
                failures.extend((lo + i, r) for i, r in fails)
                total[...] += channel_sums(arr[lo:hi])
                if progress is not None:
                    progress.advance(hi - lo)
                finished, pending = wait(pending, timeout=0)
            else:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            warm = warm or bool(finished)
            collect(finished)
    except BrokenProcessPool:
        owner.close()
        raise DataError(
            "a decode worker process died (a crash inside an image decoder?); "
            "rerun with IMGCLS_DECODE=threads to find the file"
        ) from None
    except BaseException:
        # On Ctrl-C: queued chunks are dropped and we wait for the workers
        # (SIGINT ignored) to end after the chunk in hand (~CHUNK_S): one
        # still starting would otherwise print a traceback after we are gone.
        # Then the caller removes what was half-written.
        owner.close(wait=True)
        raise


def main_importable() -> bool:
    """Whether a spawned process can import this one's ``__main__`` again
    (it cannot when that is a script read from stdin)."""
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    if getattr(main, "__spec__", None) is not None or path is None:
        return True
    original: str | None = getattr(multiprocessing.process, "ORIGINAL_DIR", None)  # set at its import
    if not os.path.isabs(path) and original is not None:
        path = os.path.join(original, path)
    return os.path.isfile(path)


class DecodePool:
    """Decode worker processes kept across :func:`decode_into` calls (the
    splits of one dataset: spawning costs a few hundred ms). The caller owns
    it and ends it: ``with DecodePool() as pool: decode_into(..., pool=pool)``.
    Nothing about it is global, so threads each with their own pool do not
    meet."""

    def __init__(self) -> None:
        self._workers = 0
        self._pool: ProcessPoolExecutor | None = None

    def ready(self, workers: int) -> bool:
        """Whether a started pool of ``workers`` is at hand (no start cost)."""
        return self._pool is not None and self._workers == workers

    def get(self, workers: int) -> tuple[ProcessPoolExecutor, bool]:
        """(pool, warm): the kept pool when it has this size, else a new one."""
        if self._pool is not None and self.ready(workers):
            return self._pool, True
        self.close()
        _prestart()
        # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (a
        # crash inside a decoder) breaks the pool with an error instead of being
        # silently replaced while its chunk is waited for forever.
        self._pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=interrupts.ignore)
        self._workers = workers
        return self._pool, False

    def close(self, wait: bool = False) -> None:
        pool, self._pool, self._workers = self._pool, None, 0
        if pool is not None:
            pool.shutdown(wait=wait, cancel_futures=True)

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _prestart() -> None:
    """Start the forkserver now (its numpy/PIL imports, ~0.3 s, then overlap
    the serial probe instead of delaying the first worker). Costs nothing
    when it already runs; a no-op without forkserver.

    A terminal's Ctrl-C reaches the whole process group: a server still
    importing would die with a KeyboardInterrupt traceback, taking the pool
    down with an EOFError. So the server's first import is
    :mod:`imgcls.data.decode_server`, which ignores SIGINT (its workers
    inherit that) before anything else loads. This process must not ignore
    SIGINT meanwhile, not even for the few ms of the fork and exec: a Ctrl-C
    landing there would be lost. It is held instead and raised once the
    server is started."""
    ctx = _context()
    if ctx.get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with interrupts.postponed():
        forkserver.ensure_running()


def _context() -> multiprocessing.context.BaseContext:
    """``forkserver`` where there is one (Linux, macOS): a server process
    imports the decode module once, then each worker is a fork of it (~10 ms
    instead of ~300 ms of interpreter start and numpy/PIL imports per worker,
    which on 2 cores is CPU taken from decoding). Workers are never forked
    from this process, whose torch or progress threads may hold locks.
    Elsewhere ``spawn``. As with any multiprocessing start method but fork,
    a worker imports the parent's ``__main__`` (a script calling imgcls needs
    the usual ``if __name__ == "__main__":`` guard)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["imgcls.data.decode_server", "imgcls.data.decode"])
        return ctx
    return multiprocessing.get_context("spawn")
