"""`imgcls train`: parse the recipe and overrides, fit (or launch N processes), print the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command, debugging, log_to_stderr, stderr
from imgcls.cli.render import train_closing, train_summary


@command
def train(
    recipe: Annotated[
        Path | None, typer.Argument(help="The recipe YAML (optional with --resume: the run's own).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a recipe value: key.path=value (repeatable).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Same as --set train.epochs=N.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder to create (default `runs/<name>/<n>`); must be new or empty."),
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue a stopped run folder exactly where it stopped.")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the final result as JSON.")] = False,
    nproc: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Train with N local processes (one per GPU on CUDA) through torch's elastic launcher.",
        ),
    ] = None,
    max_restarts: Annotated[
        int, typer.Option(min=0, help="With --nproc: restart the group up to K times if a process dies.")
    ] = 0,
    port: Annotated[
        int | None,
        typer.Option(min=1, max=65535, help="With --nproc: the rendezvous port (default: a free one)."),
    ] = None,
) -> None:
    """Fit the network a recipe declares; write the run folder `runs/NAME/N/`.

    The run folder gets best.safetensors, last.safetensors, resume state,
    metrics.csv, curves.png, the resolved recipe and the summary. Ctrl-C saves
    the state and prints how to resume.

    Examples:

        imgcls train recipes/quickstart.yaml

        imgcls train recipes/quickstart.yaml --epochs 3 --set train.optimizer.lr=3e-3

        imgcls train recipes/quickstart.yaml --set data.source=folder --set data.path=~/pets

        imgcls train --resume runs/quickstart/1

        imgcls train recipes/quickstart.yaml --nproc 2
    """

    from imgcls.recipe import load_recipe

    recipe_path, overrides = _recipe_source(recipe, resume, out, list(set_ or []), epochs, device)
    parsed = load_recipe(recipe_path, overrides)
    if nproc is not None:
        from imgcls.distributed import check_launch, launch, oversubscribed

        check_launch(nproc, parsed)
        if warning := oversubscribed(nproc, parsed):
            stderr().print(warning, markup=False)
        worker = ["--debug"] if debugging() else []
        worker += ["train", str(recipe_path), *(f"--set={o}" for o in overrides)]
        worker += [f"--out={out}"] if out is not None else []
        worker += [f"--resume={resume}"] if resume is not None else []
        worker += ["--quiet"] if quiet else []
        worker += ["--json"] if as_json else []
        raise typer.Exit(launch(worker, nproc, max_restarts=max_restarts, port=port))
    if max_restarts or port is not None:
        raise typer.BadParameter("--max-restarts and --port go with --nproc (torchrun has its own)")
    from imgcls.distributed import rank_failure, this_rank
    from imgcls.errors import ImgclsError
    from imgcls.training import train as run_training

    rank = this_rank()
    try:
        result = run_training(
            parsed,
            base_dir=recipe_path.parent,
            out=out,
            resume=resume,
            log=log_to_stderr(quiet),
            progress=not quiet and sys.stderr.isatty(),
        )
    except (ImgclsError, KeyboardInterrupt) as exc:
        outcome = rank_failure(rank, exc)
        if outcome is exc:
            raise
        if isinstance(outcome, int):
            raise typer.Exit(outcome) from None
        raise outcome from None
    if rank != 0:  # rank 0 reports the run
        return
    summary = train_summary(result)
    print(json.dumps(summary) if as_json else train_closing(summary))


def _recipe_source(
    recipe: Path | None, resume: Path | None, out: Path | None, overrides: list[str], epochs, device
) -> tuple[Path, list[str]]:
    """The recipe file to read (the run's own on --resume) and the --set overrides."""
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if device is not None:
        overrides.append(f"train.device={device}")
    if resume is not None and out is not None:
        raise typer.BadParameter("--out makes a new run; --resume continues one: give one of them")
    if recipe is not None:
        return recipe, overrides
    if resume is None:
        raise typer.BadParameter("give a recipe file, or --resume RUN_FOLDER")
    recipe_path = resume / "recipe.yaml"
    if not recipe_path.is_file():
        from imgcls.errors import UsageError

        raise UsageError(f"{resume}: not a run folder (no recipe.yaml)")
    return recipe_path, overrides
