"""The live progress bar of a run on a terminal, and the line each finished epoch prints."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def epoch_line(row: dict, epochs: int) -> str:
    text = f"epoch {row['epoch']}/{epochs}  loss {row['train_loss']:.4f}  acc {row['train_acc']:.4f}"
    if "val_loss" in row:
        text += f"  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.4f}"
        if "val_f1" in row:
            text += f"  val_f1 {row['val_f1']:.4f}"
    return text + f"  {row['img_per_s']:.0f} img/s  {row['seconds']:.1f}s"


class Progress:
    """A live bar for the running epoch on a terminal (loss, accuracy, img/s,
    ETA), with one permanent line per finished epoch above it; nothing otherwise."""

    REFRESH = 0.25  # seconds between reads of the device's running sums

    def __init__(self, enabled: bool, epochs: int, steps: int):
        self.epochs, self.steps = epochs, steps
        self.progress: Any = None  # rich's Progress, on a terminal
        self.task: Any = None
        self.t0: float = 0.0
        self.seen0: int | None = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                console=Console(stderr=True),
                transient=True,
            )
            self.progress.start()

    def start_epoch(self, epoch: int, step: int, stats: Callable[[], tuple[float, float, int]]) -> None:
        if self.progress:
            self.task = self.progress.add_task(
                f"epoch {epoch + 1}/{self.epochs}", total=self.steps, completed=step, stats=""
            )
            self.stats, self.t0, self.seen0 = stats, time.perf_counter(), None
            self.last = 0.0

    def advance(self) -> bool:
        """One step done. The loss and accuracy are read from the device at most
        every REFRESH seconds (each read waits for the device); True when read."""
        if not self.progress:
            return False
        self.progress.update(self.task, advance=1)
        now = time.perf_counter()
        if now - self.last < self.REFRESH:
            return False
        self.last = now
        loss, acc, seen = self.stats()
        if self.seen0 is None:
            self.seen0, self.t0 = seen, now
        rate = (seen - self.seen0) / max(now - self.t0, 1e-9)
        self.progress.update(self.task, stats=f"loss {loss:.3f} acc {acc:.3f} {rate:.0f} img/s")
        return True

    def end_epoch(self, row: dict, epochs: int) -> None:
        if self.progress:
            self.progress.remove_task(self.task)
            self.progress.console.print(epoch_line(row, epochs), highlight=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
