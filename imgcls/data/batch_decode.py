"""Decode many files into one uint8 array as fast as this machine allows.

:func:`decode_into` picks serial, threads or processes by measuring, on the
files at hand, at run time (CPUs and image sizes differ):

1. a serial probe (about :data:`PROBE_S`) gives the single-thread rate;
2. if the whole job at that rate is short (:data:`SERIAL_BELOW_S`), it stays
   serial: starting workers would cost more than it saves;
3. else a short trial with one thread per core, work handed out in chunks:
   Pillow releases the GIL while it decodes and resizes, so large images
   (photos) scale with threads; if threads reach :data:`THREADS_GOOD` of
   single rate x cores, threads do the rest;
4. else (small images: most of the time goes to Python code holding the GIL)
   a pool of processes does the rest, in chunks, each returning its rows.

Processes use the ``spawn`` context (no fork after torch started its
threads) and import only PIL and numpy; they ignore SIGINT, so Ctrl-C reaches
the parent alone, which terminates the pool and re-raises. ``IMGCLS_DECODE``
(``serial``, ``threads``, ``processes``) overrides the measurement.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

import numpy as np

from imgcls.data.decode import decode_chunk, decode_rows
from imgcls.data.progress import Task
from imgcls.errors import DataError, UsageError

MODES = ("auto", "serial", "threads", "processes")
PROBE_S = 0.15  # serial probe: long enough to time, short enough not to matter
SERIAL_BELOW_S = 1.0  # a job shorter than this at the serial rate stays serial
THREAD_TRIAL_S = 0.3  # the thread trial, at the ideal (serial x cores) rate
THREADS_GOOD = 0.8  # threads win when they reach this share of serial x cores
CHUNK_S = 0.1  # target seconds of work per chunk handed to a worker
Log = Callable[[str], None]


def decode_workers() -> int:
    """Cores this process may run on (``sched_getaffinity`` respects taskset
    and container CPU sets, ``cpu_count`` does not)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def decode_mode() -> str:
    mode = os.environ.get("IMGCLS_DECODE", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UsageError(f"IMGCLS_DECODE={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def decode_into(
    out,
    paths: Sequence[str | os.PathLike],
    channels: int,
    size: tuple[int, int],
    resize: str,
    workers: int | None = None,
    progress: Task | None = None,
    log: Log = lambda message: None,
    mode: str | None = None,
) -> list[tuple[int, str]]:
    """Decode ``paths[i]`` into ``out[i]`` (a uint8 numpy array or tensor of
    shape (N, C, H, W)); return the ``(index, reason)`` of files that failed."""
    arr = out.numpy() if hasattr(out, "numpy") else out  # a tensor shares its memory
    paths = [os.fspath(p) for p in paths]
    n = len(paths)
    workers = workers or decode_workers()
    mode = mode or decode_mode()
    failures: list[tuple[int, str]] = []

    def serial(a: int, b: int) -> None:
        failures.extend((a + i, r) for i, r in decode_rows(paths[a:b], arr[a:b], channels, size, resize))
        if progress is not None:
            progress.advance(b - a)

    # 1. serial probe
    done, start = 0, time.perf_counter()
    while done < n and (done < 16 or time.perf_counter() - start < PROBE_S):
        if mode in ("threads", "processes") and done >= 16:
            break
        step = min(16, n - done)
        serial(done, done + step)
        done += step
    rate1 = done / max(time.perf_counter() - start, 1e-9)
    left = n - done
    if left == 0:
        return sorted(failures)
    if mode == "serial" or workers == 1 or (mode == "auto" and left / rate1 < SERIAL_BELOW_S):
        serial(done, n)
        return sorted(failures)

    chunk = int(np.clip(rate1 * CHUNK_S, 8, 1024))
    if mode == "auto":
        # 2. thread trial, chunks of work per thread
        trial = min(left, max(2 * workers * chunk, int(rate1 * workers * THREAD_TRIAL_S)))
        t0 = time.perf_counter()
        _threads(arr, paths, done, done + trial, chunk, workers, channels, size, resize, failures, progress)
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
    if left == 0:
        return sorted(failures)
    if mode == "threads":
        _threads(arr, paths, done, n, chunk, workers, channels, size, resize, failures, progress)
    else:
        t0 = time.perf_counter()
        _processes(arr, paths, done, n, chunk, workers, channels, size, resize, failures, progress)
        rate_p = left / max(time.perf_counter() - t0, 1e-9)
        log(
            f"decode: {rate_p:,.0f} images/s on {workers} processes, pool start included "
            f"({rate_p / (rate1 * workers):.0%} of {workers} x 1 thread)"
        )
    return sorted(failures)


def _threads(arr, paths, a, b, chunk, workers, channels, size, resize, failures, progress) -> None:
    """Threads over chunks (one future per chunk, not per image: per-image
    futures spend small images' time handing the GIL around)."""

    def run(lo: int, hi: int) -> tuple[int, list[tuple[int, str]]]:
        return hi - lo, [
            (lo + i, r) for i, r in decode_rows(paths[lo:hi], arr[lo:hi], channels, size, resize)
        ]

    step = max(1, min(chunk, (b - a + workers - 1) // workers))
    pool = ThreadPoolExecutor(workers, thread_name_prefix="imgcls-decode")
    try:
        pending = {pool.submit(run, lo, min(lo + step, b)) for lo in range(a, b, step)}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                count, fails = f.result()
                failures.extend(fails)
                if progress is not None:
                    progress.advance(count)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle (it terminates us)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _processes(arr, paths, a, b, chunk, workers, channels, size, resize, failures, progress) -> None:
    tasks = [(lo, paths[lo : min(lo + chunk, b)], channels, tuple(size), resize) for lo in range(a, b, chunk)]
    row_shape = arr.shape[1:]
    # ProcessPoolExecutor, not multiprocessing.Pool: a worker that dies (a
    # crash inside a decoder) breaks the pool with an error instead of being
    # silently replaced while its chunk is waited for forever.
    pool = ProcessPoolExecutor(
        min(workers, len(tasks)), mp_context=multiprocessing.get_context("spawn"), initializer=_ignore_sigint
    )
    try:
        with _main_module_hidden():  # workers start during submit
            pending = {pool.submit(decode_chunk, task) for task in tasks}
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in finished:
                lo, data, fails = f.result()
                rows = np.frombuffer(data, dtype=np.uint8).reshape(-1, *row_shape)
                arr[lo : lo + len(rows)] = rows
                failures.extend((lo + i, r) for i, r in fails)
                if progress is not None:
                    progress.advance(len(rows))
    except BrokenProcessPool:
        raise DataError(
            "a decode worker process died (a crash inside an image decoder?); "
            "rerun with IMGCLS_DECODE=threads to find the file"
        ) from None
    finally:
        # On Ctrl-C: queued chunks are dropped; workers (SIGINT ignored) end
        # after the chunk in hand, and the caller removes what was half-written.
        pool.shutdown(wait=False, cancel_futures=True)


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Start spawn workers without re-running the user's ``__main__``.

    ``spawn`` re-imports the parent's main script in every worker, so a script
    calling imgcls without an ``if __name__ == "__main__"`` guard would run
    again (and try to start workers of its own). The workers need nothing from
    ``__main__`` (they import imgcls.data.decode, PIL and numpy), so while
    they start, ``__main__`` is a bare module with no file to re-run.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main
