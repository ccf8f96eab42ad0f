"""`imgcls data shapes` and `imgcls data check`: write the built-in data set, lint a data set."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command, stderr


@command
def data_shapes(
    out: Annotated[Path, typer.Argument(help="Folder to write (must not exist or be empty).")],
    per_class: Annotated[int, typer.Option(min=1, help="Images per class.")] = 300,
    size: Annotated[int, typer.Option(min=8, help="Image side in pixels.")] = 32,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same images).")] = 0,
) -> None:
    """Write the built-in shapes dataset as an ImageFolder of PNGs.

    Examples:

        imgcls data shapes ./shapes

        imgcls data shapes ./big --per-class 1000 --size 64 --seed 1
    """
    from imgcls.data.shapes import write_shapes
    from imgcls.errors import UsageError
    from imgcls.recipe import ShapesSpec

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out}: exists and is not an empty folder; choose another")
    path = write_shapes(out, ShapesSpec(per_class=per_class, image_size=size, seed=seed))
    stderr().print(f"wrote {path}", markup=False)


@command
def data_check(
    path: Annotated[
        Path,
        typer.Argument(help="An ImageFolder tree (flat, or train/val/test) or a file,label[,split] CSV."),
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Run folder or checkpoint: also flag likely label errors."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full findings as JSON.")] = False,
) -> None:
    """Lint a dataset before training on it; never modifies it.

    Counts and imbalance, unreadable files, exact and near duplicates (within
    a class, across classes, across splits), size / aspect / mode outliers
    and, with --model, likely label errors. Exit 0 when clean, 3 when
    problems were found. With --model RUN the findings are also saved as
    RUN/data-check.json for `imgcls report`.

    Examples:

        imgcls data check ~/pets

        imgcls data check labels.csv --json

        imgcls data check ~/pets --model runs/pets/1
    """
    from imgcls import interrupts
    from imgcls.data.check import check_dataset, summary_lines
    from imgcls.errors import EXIT_PARTIAL
    from imgcls.text import json_safe, one_line

    ckpt = None
    if model is not None:
        from imgcls.checkpoint import load_checkpoint

        ckpt = load_checkpoint(model)
    result = check_dataset(
        path, model=ckpt, log=lambda message: stderr().print(one_line(message), markup=False)
    )
    interrupts.check()  # a Ctrl-C that compiled code swallowed: no findings written or printed
    if ckpt is not None and ckpt.run_dir is not None:
        from imgcls.io import write_text_atomic

        write_text_atomic(
            ckpt.run_dir / "data-check.json", json.dumps(json_safe(result.to_dict()), indent=1) + "\n"
        )
    if as_json:
        print(json.dumps(json_safe(result.to_dict())), flush=True)
    else:
        print("\n".join(summary_lines(result)), flush=True)
    if not result.clean:
        raise typer.Exit(EXIT_PARTIAL)
