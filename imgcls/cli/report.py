"""`imgcls report`: one self-contained HTML page about a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command


@command
def report(
    run: Annotated[Path, typer.Argument(help="A run folder (or runs/NAME for its latest run).")],
) -> None:
    """Write RUN/report.html: one self-contained page about the run.

    Recipe, model summary, training curves, final metrics, per-class table,
    confusion matrix, error gallery, explain overlays and data-check results
    when present, environment and timings. No network: images, styles and
    the table sorting are inside the file. `train` writes it at the end of a
    run and `evaluate` refreshes it.

    Examples:

        imgcls report runs/quickstart/1
    """
    from imgcls.report import write_report

    print(write_report(run))
