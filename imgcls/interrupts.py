"""Ctrl-C that is not lost on its way to the safe points.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread
happens to be, and C code there can swallow it: importing ``numpy.random``
(which the built-in data set does lazily, as it draws its first image) drops
a KeyboardInterrupt that lands during the import (2 of 40 timed trials), and
a run interrupted then went on to train. So the CLI's handler also records
the Ctrl-C, and :func:`check` raises it again where work with lasting effects
would begin: before a run folder is made, before the first training step.
"""

from __future__ import annotations

import signal
import threading

_pressed = [False]


def _on_sigint(signum, frame) -> None:
    _pressed[0] = True
    raise KeyboardInterrupt


def install() -> None:
    """From now on a Ctrl-C raises KeyboardInterrupt and is remembered (main thread only)."""
    _pressed[0] = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def check() -> None:
    """Raise KeyboardInterrupt again if a Ctrl-C came since :func:`install`."""
    if _pressed[0]:
        raise KeyboardInterrupt
