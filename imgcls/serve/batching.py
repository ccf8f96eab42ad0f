"""Dynamic micro-batching: requests meet in a bounded queue, one thread runs the model.

The event loop never runs the model. Each request first takes a place
(:meth:`Batcher.admit`): at most ``max_queue`` requests are inside the server
at once (reading their body, decoding, waiting or in the model), so memory is
bounded by ``max_queue`` x the upload limit; past it the answer is 503 at
once, before the body is read. Decoded images go into the queue; the worker
thread, which alone owns the model, takes the first waiting image and then
up to ``max_batch`` in all, waiting at most ``max_wait_s`` for more, and only
while another admitted request is still on its way (being read or decoded):
a lone request is never kept waiting for company that is not coming.
Other work on the model (Grad-CAM) goes through the same thread, alone.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


class Overloaded(Exception):
    """The server holds ``max_queue`` requests already."""


class Stopped(Exception):
    """The server is shutting down and takes no new work."""


@dataclass
class _Job:
    item: Any
    future: Future
    alone: Callable[[], Any] | None = None  # run by itself on the worker (not batched)


class Batcher:
    """``run_batch(items) -> results`` (one result per item) on one worker thread."""

    def __init__(
        self,
        run_batch: Callable[[list], list],
        *,
        max_batch: int = 32,
        max_wait_s: float = 0.005,
        max_queue: int = 256,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._admitted = 0  # requests inside the server (reading, decoding, queued, running)
        self._arriving = 0  # admitted requests whose images are not queued yet
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ counters (for /metrics)

    @property
    def depth(self) -> int:
        """Images waiting for the model."""
        return len(self._jobs)

    @property
    def admitted(self) -> int:
        return self._admitted

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="imgcls-serve-model", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish what is queued, then stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ requests (event loop side)

    def admit(self) -> None:
        """Take a place for a request, or raise :class:`Overloaded` / :class:`Stopped`."""
        with self._cond:
            if self._stopping:
                raise Stopped
            if self._admitted >= self.max_queue:
                raise Overloaded
            self._admitted += 1
            self._arriving += 1

    def arrived(self) -> None:
        """The admitted request has queued its images (or failed before): stop waiting for it."""
        with self._cond:
            self._arriving -= 1
            self._cond.notify_all()

    def leave(self) -> None:
        """The admitted request is answered."""
        with self._cond:
            self._admitted -= 1

    def submit(self, items: list) -> list[Future]:
        """Queue ``items``; a future per item resolves to its result."""
        jobs = [_Job(item, Future()) for item in items]
        with self._cond:
            if self._stopping and self._thread is None:
                raise Stopped
            self._jobs.extend(jobs)
            self._cond.notify_all()
        return [job.future for job in jobs]

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker thread, between batches (it may use the model)."""
        job = _Job(None, Future(), alone=fn)
        with self._cond:
            self._jobs.append(job)
            self._cond.notify_all()
        return job.future

    # ------------------------------------------------------------------ the worker thread

    def _take(self) -> list[_Job] | None:
        """The next batch (or one job to run alone); None once stopped and empty."""
        with self._cond:
            while not self._jobs:
                if self._stopping:
                    return None
                self._cond.wait()
            first = self._jobs.popleft()
            if first.alone is not None:
                return [first]
            batch = [first]
            deadline = time.monotonic() + self.max_wait_s
            while len(batch) < self.max_batch:
                if self._jobs and self._jobs[0].alone is None:
                    batch.append(self._jobs.popleft())
                    continue
                left = deadline - time.monotonic()
                if self._jobs or self._arriving <= 0 or left <= 0:
                    break  # a job to run alone is next, or nobody else is on the way, or time is up
                self._cond.wait(left)
            return batch

    def _work(self) -> None:
        while (batch := self._take()) is not None:
            if batch[0].alone is not None:
                _settle(batch[0].future, batch[0].alone)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                results = self.run_batch([job.item for job in batch])
            except BaseException as exc:  # the requests get the error; the worker goes on
                for job in batch:
                    job.future.set_exception(exc)
                continue
            for job, result in zip(batch, results, strict=True):
                job.future.set_result(result)


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except BaseException as exc:
        future.set_exception(exc)
