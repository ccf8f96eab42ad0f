"""Progress for the long data steps (listing, decoding), on stderr.

On a terminal: a rich bar (listing: files found and rate; decoding: a bar
with rate and ETA), removed when the step ends. Elsewhere (a log file, CI):
a plain line through ``log`` every :data:`PLAIN_EVERY_S` seconds, and only
for steps that last that long, so short runs stay quiet.

    progress = Progress.auto(log)
    with progress.task("decoding", total=len(paths)) as task:
        ...
        task.advance(n)
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

PLAIN_EVERY_S = 5.0
Log = Callable[[str], None]


class Task:
    """One step: call :meth:`advance` as work is done (thread-safe enough:
    only the thread that owns the step calls it)."""

    def __init__(self, description: str, total: int | None, log: Log, bar=None, bar_task=None):
        self.description = description
        self.total = total
        self.done = 0
        self.start = time.perf_counter()
        self._log = log
        self._bar = bar
        self._bar_task = bar_task
        self._next_line = self.start + PLAIN_EVERY_S

    def advance(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(self._bar_task, completed=self.done)
            return
        now = time.perf_counter()
        if now >= self._next_line:
            self._next_line = now + PLAIN_EVERY_S
            self._log(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.perf_counter()) - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            return (
                f"{self.description}: {self.done}/{self.total} ({self.done / self.total:.0%}), "
                f"{rate:,.0f}/s, ETA {_clock(eta)}"
            )
        return f"{self.description}: {self.done:,} found, {rate:,.0f}/s"


class Progress:
    """Hands out :class:`Task` objects; ``terminal`` selects the rich bar."""

    def __init__(self, log: Log = lambda message: None, terminal: bool = False):
        self.log = log
        self.terminal = terminal

    @classmethod
    def auto(cls, log: Log = lambda message: None) -> Progress:
        """A bar when stderr is a terminal, else plain lines through ``log``."""
        return cls(log, terminal=sys.stderr.isatty())

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Task]:
        if not self.terminal:
            yield Task(description, total, self.log)
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        if total is None:  # listing: how many so far, and how fast
            columns = [
                TextColumn("{task.description}"),
                TextColumn("{task.completed:,} files"),
                _rate_column(),
            ]
        else:
            columns = [
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                _rate_column(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            ]
        console = Console(stderr=True)
        with RichProgress(*columns, console=console, transient=True) as bar:
            bar_task = bar.add_task(description, total=total)
            yield Task(description, total, self.log, bar, bar_task)


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _rate_column():
    """A rich column: items per second since the step started (rich's own
    speed column is for bytes)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            elapsed = task.elapsed or 0
            return Text(f"{task.completed / elapsed if elapsed > 0 else 0:,.0f}/s")

    return Rate()
