"""Error types, each carrying the exit code DESIGN promises.

0 ok, 1 runtime failure, 2 bad usage / recipe / input, 3 partial failure,
130 interrupted. The CLI prints ``str(error)`` as one line; tracebacks only
with ``--debug``.
"""

from __future__ import annotations

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130


class ImgclsError(Exception):
    """A failure we expected and can explain in one line."""

    exit_code = EXIT_FAILURE


class UsageError(ImgclsError):
    """Bad command-line usage or bad input (a file, a value)."""

    exit_code = EXIT_USAGE


class RecipeError(UsageError):
    """A recipe that cannot be loaded or validated: names file, line and key."""


class ShapeError(RecipeError):
    """A layer stack that cannot work on the given input shape."""


class DataError(UsageError):
    """A dataset that cannot be used as asked."""


class CheckpointError(UsageError):
    """A checkpoint or run folder that cannot be read or does not fit."""


class PartialFailure(ImgclsError):
    """Some items failed, the rest were processed."""

    exit_code = EXIT_PARTIAL


class Diverged(ImgclsError):
    """Training's loss or weights became NaN / infinite (exit 1); nothing of it is saved."""


class Interrupted(ImgclsError):
    exit_code = EXIT_INTERRUPTED
