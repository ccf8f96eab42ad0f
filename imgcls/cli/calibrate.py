"""`imgcls calibrate`: refit a run's temperature on labelled images (:mod:`imgcls.recalibrate`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command, log_to_stderr, stdout


@command
def calibrate(
    target: Annotated[
        str, typer.Argument(help="A run folder, `runs/<name>` (its latest run) or a .safetensors checkpoint.")
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Labelled images: a folder of class folders (or its test/ or val/), or a CSV. "
            "Default: the run's validation split.",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 128,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Refit the temperature that calibrates the model's probabilities.

    Temperature scaling divides the logits by T, fitted by minimising the
    negative log-likelihood on labelled images (multi-label: one T per
    class); the top class never changes. `train` fits T on the validation
    split; this refits it on other data and writes it into the run's
    checkpoints (best, last and tuned copies; the weights are not touched).
    Prints ECE, MCE, NLL and Brier before (T = 1) and after.

    Examples:

        imgcls calibrate runs/quickstart/1 --data ~/pets/val

        imgcls calibrate runs/quickstart/1/best.safetensors --data labels.csv --json
    """
    from imgcls.calibration import calibration_table, summary_line
    from imgcls.recalibrate import recalibrate
    from imgcls.text import json_safe, one_line, shown

    result = recalibrate(target, data, batch_size=batch_size, log=log_to_stderr(quiet))
    if as_json:
        print(json.dumps(json_safe(result.to_dict())), flush=True)
    else:
        console = stdout()
        console.print(calibration_table(result.report))
        console.print(one_line(summary_line(result.stored)), markup=False, highlight=False)
        console.print(
            f"written: {', '.join(shown(p) for p in result.written)}", markup=False, highlight=False
        )
    result.raise_if_skipped()
