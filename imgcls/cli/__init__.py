"""The command line: one module per command (or group), each a thin parse →
call one library function → render (:mod:`imgcls.cli.render`).

``imgcls = "imgcls.cli:main"``. Importing this package registers every
command on :data:`app`; the commands import their library code when they run,
so ``imgcls --help`` stays fast.
"""

from __future__ import annotations

import os
import sys

from imgcls import interrupts
from imgcls.cli import (
    cache,
    calibrate,
    compare,
    cv,
    data,
    evaluate,
    explain,
    export,
    pick,
    predict,
    report,
    runs,
    serve,
    summarize,
    train,
    tune,
)
from imgcls.cli.app import _state, app, cache_app, data_app
from imgcls.errors import EXIT_FAILURE, EXIT_INTERRUPTED

# the commands, in the order `imgcls --help` lists them (groups come after)
app.command()(train.train)
app.command()(summarize.summarize)
app.command()(summarize.models)
app.command()(compare.compare)
app.command()(evaluate.evaluate)
app.command()(predict.predict)
app.command()(pick.pick)
app.command()(export.export)
app.command()(calibrate.calibrate)
app.command()(serve.serve)
app.command()(explain.explain)
app.command()(report.report)
app.command()(tune.tune)
app.command()(cv.cv)
app.command()(runs.runs)
data_app.command("shapes")(data.data_shapes)
data_app.command("check")(data.data_check)
cache_app.command("list")(cache.cache_list)
cache_app.command("clear")(cache.cache_clear)

__all__ = ["_state", "app", "main"]


def main() -> None:
    interrupts.hold()  # released once torch is imported (in `command`), or when app() returns
    try:
        try:
            app()
        finally:
            interrupts.release()
    except BrokenPipeError:
        # the reader went away (`imgcls ... | head`): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        # Ctrl-C outside a command (while parsing, while importing the CLI)
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
