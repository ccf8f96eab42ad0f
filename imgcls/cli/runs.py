"""`imgcls runs`: every run in one table, or two runs side by side (--diff)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import _error, command, stderr, stdout, wide_stdout
from imgcls.cli.render import diff_renderables, diff_rows, runs_table


@command
def runs(
    root: Annotated[Path, typer.Argument(help="Folder of run folders (or one run folder).")] = Path("runs"),
    sort: Annotated[
        str | None, typer.Option(help="Sort by a column, best first: val_acc, test_acc, seconds, date, ...")
    ] = None,
    diff: Annotated[
        tuple[Path, Path] | None,
        typer.Option("--diff", help="Two run folders: recipe and metric differences side by side."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV with a header row.")] = False,
) -> None:
    """A table of every run: architecture, params, epochs, best val and test accuracy, time, device.

    Examples:

        imgcls runs

        imgcls runs runs/quickstart-tune --sort val_acc

        imgcls runs --csv > runs.csv

        imgcls runs --diff runs/quickstart/1 runs/quickstart/2
    """

    import csv

    from imgcls.errors import PartialFailure, UsageError
    from imgcls.runs import COLUMNS, diff_runs, fmt, list_runs

    if as_json and as_csv:
        raise UsageError("choose one of --json and --csv")
    if diff is not None:
        result = diff_runs(*diff)
        if as_json:
            print(json.dumps(result))
        elif as_csv:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(["section", "key", "a", "b"])
            writer.writerows(diff_rows(result))
        else:
            out = stdout()
            for renderable in diff_renderables(result, str(diff[0]), str(diff[1]), fmt):
                out.print(renderable)
        return
    rows = list_runs(root, sort)
    bad = [r for r in rows if r["problems"]]
    for r in bad:
        for line in r["problems"]:
            _error(line)
    if as_json:
        print(json.dumps(rows))
    elif as_csv:
        table = csv.DictWriter(sys.stdout, [*COLUMNS, "problems"], lineterminator="\n", extrasaction="ignore")
        table.writeheader()
        table.writerows({**r, "problems": " | ".join(r["problems"])} for r in rows)
    elif not rows:
        stderr().print(f"no runs under {root}", markup=False)
    else:
        wide_stdout().print(runs_table([_shown(r) for r in rows], COLUMNS, fmt, problems=bool(bad)))
    if bad:
        raise PartialFailure(
            f"{len(bad)} of {len(rows)} runs {'has' if len(bad) == 1 else 'have'} files that cannot be "
            "read (listed above; the columns from those files are empty); the other runs are complete"
        )


def _shown(row: dict) -> dict:
    """The table's run cell: a cross-validation says so, its folds are indented below it."""
    if row.get("cv_parent") is not None:
        return {**row, "run": "  └ " + Path(row["run"]).name}
    if row.get("cv") is not None:
        return {
            **row,
            "run": f"{row['run']} (cv: mean of {row['cv']['finished']}/{row['cv']['folds']} folds)",
        }
    return row
