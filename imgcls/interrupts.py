"""Ctrl-C that is not lost on its way to the safe points.

Python turns SIGINT into a KeyboardInterrupt raised wherever the main thread
happens to be, and C code there can swallow it: importing ``numpy.random``
(which the built-in data set does lazily, as it draws its first image) drops
a KeyboardInterrupt that lands during the import (2 of 40 timed trials), and
a run interrupted then went on to train. So the CLI's handler also records
the Ctrl-C, and :func:`check` raises it again where work with lasting effects
would begin or a result would be printed: before a run folder is made, before
the first training step, between the batches of evaluate and predict, before
an export, an evaluation's files or a study's folder are written.

Once the command has returned (its result is out), :func:`finish` makes a
Ctrl-C harmless: raised while the interpreter shuts down, it would only print
``Exception ignored in atexit callback ... KeyboardInterrupt``.
"""

from __future__ import annotations

import signal
import threading

_pressed = [False]


def _on_sigint(signum, frame) -> None:
    _pressed[0] = True
    raise KeyboardInterrupt


def _after_the_command(signum, frame) -> None:
    # the first Ctrl-C during shutdown is dropped; a second ends the process
    # as an unhandled SIGINT does (exit 130 in a shell), should shutdown hang
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def install() -> None:
    """From now on a Ctrl-C raises KeyboardInterrupt and is remembered (main thread only)."""
    _pressed[0] = False
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _on_sigint)


def pressed() -> bool:
    """Did a Ctrl-C come since :func:`install` (raised, or swallowed on its way)?"""
    return _pressed[0]


def check() -> None:
    """Raise KeyboardInterrupt again if a Ctrl-C came since :func:`install`."""
    if _pressed[0]:
        raise KeyboardInterrupt


def finish() -> None:
    """The command has returned: a Ctrl-C from now on changes nothing and prints nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _after_the_command)
