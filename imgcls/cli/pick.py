"""`imgcls pick`: the unlabelled images most worth labelling next, ranked."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command, stderr, wide_stdout


@command
def pick(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Unlabelled image files, folders (recursive), patterns, or - for names on stdin."
        ),
    ],
    n: Annotated[int, typer.Option("--n", "-n", help="How many images to pick.")] = 100,
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy",
            "-s",
            help="margin (top two classes close), entropy, least-confidence (low top probability), "
            "diverse (margin, then spread over the model's embeddings), or random.",
        ),
    ] = "margin",
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Run folder, .safetensors checkpoint, or exported .onnx/.pt/.ts (default: newest run under ./runs).",
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the ranked list to this .csv or .json file.")
    ] = None,
    copy_to: Annotated[
        Path | None,
        typer.Option(
            "--copy-to",
            help="Copy the picked files into this new (or empty) folder, named <rank>-<name>, with picks.csv. "
            "The originals are not touched.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The result as one JSON object on stdout.")] = False,
    tta: Annotated[
        bool, typer.Option("--tta", help="Score with the mean of the logits of the image and its mirror.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of --strategy random.")] = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
) -> None:
    """The N unlabelled images the model is least sure of: label these next.

    Prints the ranked list (rank, file, score: higher = less sure, the
    predicted label and its probability). Unreadable files get an error line
    and the exit code is 3; the others are still ranked.

    Examples:

        imgcls pick --model runs/digits/1 unlabelled/ --n 100 --out picks.csv

        imgcls pick --model runs/digits/1 unlabelled/ --n 50 --strategy diverse --copy-to to-label/
    """
    from imgcls.errors import PartialFailure, UsageError
    from imgcls.pick import pick as run_pick
    from imgcls.pick_out import check_list_path, write_list
    from imgcls.text import json_safe, one_line, shown

    if out is not None:
        check_list_path(out)
        if copy_to is not None and copy_to.resolve() in out.resolve().parents:
            raise UsageError(f"--out {shown(out)}: is inside --copy-to, which gets its own picks.csv")
    err = stderr()
    picked = run_pick(
        paths,
        n=n,
        strategy=strategy,
        model=model,
        batch_size=batch_size,
        tta=tta,
        seed=seed,
        copy_to=copy_to,
        log=lambda message: err.print(message, markup=False),
    )
    for failure in picked.failures:
        err.print(f"error: {shown(failure.file)}: {one_line(failure.error)}", markup=False)
    if out is not None and picked.picks:
        write_list(out, picked.picks, json_safe(picked.to_dict()))
    if as_json:
        print(json.dumps(json_safe(picked.to_dict())))
    elif picked.picks:
        wide_stdout().print(_table(picked))
    if picked.picks:
        said = f"picked {len(picked.picks)} of {picked.scored} images by {picked.strategy}"
        if out is not None:
            said += f"; list: {shown(out)}"
        if picked.copied_to is not None:
            said += f"; copies: {shown(picked.copied_to)}"
        err.print(said, markup=False)
    total = picked.scored + len(picked.failures)
    if not picked.scored:
        raise UsageError(f"none of the {total} files could be read")
    if picked.failures:
        raise PartialFailure(
            f"{len(picked.failures)} of {total} files could not be read (the others were ranked)"
        )


def _table(picked):
    from rich.table import Table

    from imgcls.text import cell

    table = Table()
    table.add_column("#", justify="right")
    table.add_column("file", overflow="fold")
    table.add_column("score", justify="right")
    table.add_column("least sure label" if picked.task == "multilabel" else "label")
    table.add_column("p", justify="right")
    for p in picked.picks:
        table.add_row(str(p.rank), cell(p.file), f"{p.score:.3f}", cell(p.label), f"{p.probability:.3f}")
    return table
