"""Ctrl-C: the one place that decides what SIGINT does.

Every command, the training loop, tune and the decode pool go through here;
no other module calls ``signal.signal`` for SIGINT.

- :func:`hold` / :func:`release`: block SIGINT at the OS level while torch
  imports (a SIGINT there can abort in C++ or leave half-initialised modules);
  one that arrives meanwhile is raised as a plain KeyboardInterrupt on release.
- :func:`install` / :func:`check`: Python turns SIGINT into a KeyboardInterrupt
  raised wherever the main thread happens to be, and C code there can swallow
  it: importing ``numpy.random`` (which the built-in data set does lazily, as
  it draws its first image) drops a KeyboardInterrupt that lands during the
  import (2 of 40 timed trials), and a run interrupted then went on to train.
  So the handler also records the Ctrl-C, and :func:`check` raises it again
  where work with lasting effects would begin or a result would be printed:
  before a run folder is made, before the first training step, between the
  batches of evaluate and predict, before an export, an evaluation's files or
  a study's folder are written.
- :func:`finish`: once the command has returned (its result is out), a Ctrl-C
  is harmless: raised while the interpreter shuts down, it would only print
  ``Exception ignored in atexit callback ... KeyboardInterrupt``.
- :func:`handled`: while a block runs, Ctrl-C calls a function instead
  (training stops after the running step, tune after the running trial).
- :func:`postponed`: a Ctrl-C during the block is raised when it ends.
- :func:`ignore`, :func:`block_in_this_thread`: worker processes leave Ctrl-C
  to their parent.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

_pressed = [False]


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def hold() -> None:
    """Block Ctrl-C (SIGINT) at the OS level until :func:`release`.

    A SIGINT in the middle of torch's import can abort in C++ (exit 134),
    leave half-initialised modules behind (an ImportError or RecursionError
    on the next import), or be swallowed by click ("Aborted!", exit 1). Held,
    it stays pending and is raised as a plain KeyboardInterrupt at the safe
    point where it is released."""
    if hasattr(signal, "pthread_sigmask") and _main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def release() -> None:
    """Unblock SIGINT; one that arrived while held is raised here."""
    if hasattr(signal, "pthread_sigmask") and _main_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


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
    if _main_thread():
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
    if _main_thread():
        signal.signal(signal.SIGINT, _after_the_command)


@contextmanager
def handled(on_sigint: Callable[[int], None]) -> Iterator[None]:
    """While the block runs, Ctrl-C calls ``on_sigint(n)`` (n = 1 for the first
    press, 2 for the second, ...) instead of raising; ``on_sigint`` may raise
    KeyboardInterrupt itself. The previous handler comes back at the end.
    Main thread only: elsewhere the block runs with Ctrl-C left as it was."""
    if not _main_thread():
        yield
        return
    presses = [0]

    def handler(signum, frame) -> None:
        presses[0] += 1
        on_sigint(presses[0])

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def postponed() -> Iterator[None]:
    """A Ctrl-C during the block is raised as KeyboardInterrupt as soon as it ends
    (e.g. while worker processes start: interrupted there, a started worker is
    not yet its pool's, and would outlive us)."""
    caught: list[int] = []
    with handled(caught.append):
        yield
    if caught:
        raise KeyboardInterrupt


def block_in_this_thread() -> None:
    """Block SIGINT in the calling thread (any thread, not only the main one):
    processes it starts begin with SIGINT blocked, and :func:`ignore` it before
    they unblock it, so a Ctrl-C meant for the parent never reaches them."""
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def ignore(*, unblock: bool = False) -> None:
    """In a worker process: Ctrl-C is the parent's to handle (it ends the workers).
    ``unblock``: the process was started with SIGINT blocked (:func:`block_in_this_thread`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if unblock and hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
