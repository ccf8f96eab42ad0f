"""`imgcls tune`: an Optuna search over a recipe; the trials as a table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from imgcls.cli.app import command, log_to_stderr, wide_stdout
from imgcls.cli.render import trials_table, tune_lines


@command
def tune(
    recipe: Annotated[Path, typer.Argument(help="The recipe YAML every trial starts from.")],
    trials: Annotated[
        int,
        typer.Option(
            "--trials", "-n", min=1, help="Finished trials the study should hold (a rerun adds the rest)."
        ),
    ],
    space: Annotated[
        Path | None,
        typer.Option(help="Search space YAML (default: RECIPE's name with .space.yaml, beside it)."),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna database URL, shared by several processes (default: sqlite in the study folder)."
        ),
    ] = None,
    study: Annotated[
        str | None, typer.Option(help="Study name and folder (default: `<recipe name>-tune`).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.0, help="Start no new trial after this many seconds.")
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, help="Trials at once, each in its own worker process.")
    ] = 1,
    metric: Annotated[
        str, typer.Option(help="The objective: val_acc (maximised), val_loss, train_acc or train_loss.")
    ] = "val_acc",
    pruner: Annotated[str, typer.Option(help="median, hyperband or none.")] = "median",
    startup_trials: Annotated[
        int, typer.Option(min=0, help="Median pruner: trials that run in full before any is pruned.")
    ] = 2,
    seed: Annotated[
        int | None,
        typer.Option(help="Sampler seed: the same command tries the same values (default: train.seed)."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe value for every trial: key.path=value."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Search hyperparameters with Optuna; each trial is a normal run folder.

    The space file maps the key paths `--set` takes to distributions:
    `train.optimizer.lr: {loguniform: [1e-4, 1e-1]}`, `{uniform: [0, 0.4]}`,
    `{int: [16, 128]}`, `{choice: [adam, sgd]}`. Trials go to
    runs/STUDY/N/; poor ones are pruned after an epoch. At the end:
    trials.csv, best.yaml (a plain recipe) and importance.png in the study
    folder. Ctrl-C stops after the running trial; rerun to continue.

    Examples:

        imgcls tune recipes/quickstart.yaml --trials 20

        imgcls tune recipes/quickstart.yaml --trials 50 --space lr.yaml --timeout 3600

        imgcls tune r.yaml --trials 100 --storage postgresql://host/db --study shared
    """

    from imgcls.tune import tune as run_tune

    result = run_tune(
        recipe,
        trials=trials,
        space=space,
        overrides=list(set_ or []),
        storage=storage,
        study=study,
        timeout=timeout,
        jobs=jobs,
        metric=metric,
        pruner=pruner,
        startup_trials=startup_trials,
        seed=seed,
        log=log_to_stderr(),
    )
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        out = wide_stdout()
        out.print(trials_table(result))
        for line in tune_lines(result):
            out.print(line, markup=False)
    if result.interrupted:
        from imgcls.errors import Interrupted

        raise Interrupted(f"stopped by Ctrl-C; rerun the same command to continue study '{result.study}'")
