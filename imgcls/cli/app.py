"""The Typer application, its command groups, and what every command shares:
the consoles, the --debug flag and the wrapper that turns errors into one
line and an exit code.

Heavy imports (torch, torchvision) happen inside the commands so that
``imgcls --help`` stays fast. Results go to stdout, progress and logs to
stderr. Exit codes: 0 ok, 1 failure, 2 bad usage/input, 3 partial, 130 Ctrl-C.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Annotated

import typer

from imgcls import __version__, interrupts
from imgcls.errors import EXIT_FAILURE, EXIT_INTERRUPTED, ImgclsError

app = typer.Typer(
    name="imgcls",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Datasets: write out the built-in example set.", no_args_is_help=True)
app.add_typer(data_app, name="data")
cache_app = typer.Typer(
    help="The decoded-image cache ($IMGCLS_CACHE/decoded, capped by IMGCLS_CACHE_MAX).", no_args_is_help=True
)
app.add_typer(cache_app, name="cache")

_state = {"debug": False}


def stderr():
    from rich.console import Console

    # emoji=False: a name like ':cat:' is data (markup is escaped or off where names are printed)
    return Console(stderr=True, highlight=False, soft_wrap=True, emoji=False)


def stdout():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, emoji=False)


def wide_stdout():
    """A wide table stays whole when piped (rich would squeeze it to 80 columns)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250, emoji=False)


def log_to_stderr(quiet: bool = False) -> Callable[[str], None]:
    """The ``log`` a library function gets: plain lines on stderr (none when quiet)."""
    if quiet:
        return lambda message: None
    return lambda message: stderr().print(message, markup=False)


def debugging() -> bool:
    return _state["debug"]


def _error(message: str) -> None:
    """One line on stderr, whatever the terminal width (and whatever names it quotes)."""
    from rich.markup import escape

    from imgcls.text import one_line

    stderr().print(f"[red]error:[/red] {escape(one_line(message))}")


def command(fn):
    """Turn library errors into one line on stderr and the right exit code.
    ``--debug`` adds the traceback; the exit code stays the error's."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            interrupts.hold()
            try:
                import torch  # noqa: F401  (the slow, fragile import, done while Ctrl-C is held)
            finally:
                interrupts.release()  # a Ctrl-C held meanwhile is raised here, inside this try
            interrupts.install()  # and one that C code swallows later is raised again (see there)
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, typer.BadParameter):
            raise  # usage errors: click prints them with the usage line, exit 2
        except ImgclsError as exc:
            _traceback_if_debug()
            _error(str(exc))
            raise typer.Exit(exc.exit_code) from None
        except BrokenPipeError:
            raise
        except KeyboardInterrupt:
            _traceback_if_debug()
            stderr().print("interrupted", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # an unexpected failure: still one line
            _traceback_if_debug()
            hint = "" if _state["debug"] else " (run with --debug for the traceback)"
            _error(f"{type(exc).__name__}: {exc}{hint}")
            raise typer.Exit(EXIT_FAILURE) from None
        finally:
            interrupts.finish()  # said and done: a Ctrl-C as the process exits prints no traceback

    return wrapper


def _traceback_if_debug() -> None:
    if _state["debug"]:
        import traceback

        traceback.print_exc(file=sys.stderr)


def _version(value: bool) -> None:
    if value:
        print(f"imgcls {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    version: Annotated[
        bool | None,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Train, inspect and ship image classifiers from the terminal.

    Examples:

        imgcls train recipes/quickstart.yaml

        imgcls evaluate runs/quickstart/1

        imgcls predict photo.jpg --model runs/quickstart/1

        imgcls summarize vgg16
    """
    _state["debug"] = debug
