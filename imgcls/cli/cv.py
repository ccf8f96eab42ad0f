"""`imgcls cv`: K-fold cross-validation of a recipe; mean ± std over the folds."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from imgcls.cli.app import command, log_to_stderr, wide_stdout


@command
def cv(
    recipe: Annotated[Path | None, typer.Argument(help="The recipe YAML (not with --resume).")] = None,
    folds: Annotated[int | None, typer.Option("--folds", "-k", help="Number of folds K (2 or more).")] = None,
    group_by: Annotated[
        str | None,
        typer.Option(help="CSV data: a column (named in the header row) whose rows stay in one fold."),
    ] = None,
    group_by_folder: Annotated[
        int | None,
        typer.Option(
            metavar="DEPTH",
            help="Folder data: images under the same sub-folder (DEPTH levels below the class folder) "
            "stay in one fold.",
        ),
    ] = None,
    final: Annotated[
        bool, typer.Option("--final", help="Then train on every image for the folds' mean best epoch.")
    ] = False,
    nproc: Annotated[
        int | None, typer.Option(help="Train each fold with N local processes (as `imgcls train --nproc`).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe value: key.path=value (repeatable).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="The cross-validation folder (default `runs/<name>/cv-<n>`).")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue a stopped cross-validation folder from its first unfinished fold."),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print cv.json's content as JSON.")] = False,
) -> None:
    """Cross-validate a recipe: K stratified folds, each a normal run folder.

    The training images (train and val; test is left alone) are dealt into K
    folds, stratified by class (multi-label: iterative stratification) and
    seeded by data.split_seed. Each fold trains on the others and validates
    on itself, in `runs/NAME/cv-N/fold-I/`. The folder gets cv.json and the
    table: mean ± std, min, max and each fold's value of every metric.
    `--group-by`/`--group-by-folder` keep related images (a patient, an
    object, near-copies) in one fold, so they cannot leak from train to val.
    Ctrl-C stops the running fold with its state saved; `--resume` continues.

    Examples:

        imgcls cv recipes/quickstart.yaml --folds 5

        imgcls cv pets.yaml --folds 5 --group-by-folder 1 --final

        imgcls cv xray.yaml --folds 5 --group-by patient --nproc 2

        imgcls cv --resume runs/quickstart/cv-1
    """

    from imgcls import cv as crossval
    from imgcls.errors import UsageError

    log = log_to_stderr(quiet)
    if resume is not None:
        given = [name for name, v in _fresh_options(recipe, folds, group_by, group_by_folder, set_, out) if v]
        if given:
            raise UsageError(f"--resume continues with the options it started with; leave out {given[0]}")
        plan = crossval.open_plan(resume)
        if final and not plan.doc["final"]:
            plan.doc["final"] = True
    else:
        if recipe is None:
            raise UsageError("give a recipe file, or --resume CV_FOLDER")
        if folds is None:
            raise UsageError("give --folds K (2 or more)")
        from imgcls.recipe import load_recipe

        parsed = load_recipe(recipe, list(set_ or []))
        if nproc is not None:
            from imgcls.distributed import check_launch

            check_launch(nproc, parsed)
        plan = crossval.start(
            parsed,
            base_dir=recipe.parent,
            folds=folds,
            group_by=group_by,
            group_by_folder=group_by_folder,
            final=final,
            out=out,
            log=log,
        )
    doc = crossval.run(plan, nproc=nproc, log=log, progress=not quiet and sys.stderr.isatty())
    if as_json:
        print(json.dumps({"cv_dir": str(plan.parent), **doc}))
        return
    console = wide_stdout()
    console.print(cv_table(doc))
    for line in cv_closing(doc, plan.parent):
        console.print(line, markup=False)


def _fresh_options(recipe, folds, group_by, group_by_folder, set_, out) -> list[tuple[str, Any]]:
    return [
        ("RECIPE", recipe),
        ("--folds", folds),
        ("--group-by", group_by),
        ("--group-by-folder", group_by_folder),
        ("--set", set_),
        ("--out", out),
    ]


def _num(name: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    if name == "best_epoch":
        return f"{value:g}" if float(value).is_integer() else f"{value:.1f}"
    return f"{value:.4f}"


def cv_table(doc: dict):
    """metric | mean ± std | min | max | spread | fold 1 … fold K."""
    from rich.table import Table

    table = Table(title=f"{doc['folds']}-fold cross-validation", title_justify="left")
    for name in ("metric", "mean ± std", "min", "max", "max - min"):
        table.add_column(name, justify="left" if name == "metric" else "right")
    for r in doc["runs"]:
        table.add_column(f"fold {r['fold']}", justify="right")
    for name, s in doc["summary"].items():
        spread = _num(name, s["max"] - s["min"])
        table.add_row(
            name,
            f"{_num(name, s['mean'])} ± {_num(name, s['std'])}",
            _num(name, s["min"]),
            _num(name, s["max"]),
            spread,
            *(_num(name, v) for v in s["values"]),
        )
    return table


def cv_closing(doc: dict, parent: Path) -> list[str]:
    lines = []
    headline = next((k for k in ("val_f1", "val_acc") if k in doc["summary"]), None)
    if headline is not None:
        s = doc["summary"][headline]
        lines.append(
            f"{headline} {s['mean']:.4f} ± {s['std']:.4f} (std over {len(s['values'])} folds; "
            f"min {s['min']:.4f}, max {s['max']:.4f})"
        )
    if doc.get("final_run"):
        lines.append(
            f"final model: {parent / doc['final_run']['run_dir']} ({doc['final_run']['epochs']} epochs)"
        )
    lines.append(f"cross-validation folder: {parent}")
    return lines
