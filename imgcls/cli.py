"""Commands: parse → call one library function → render.

Heavy imports (torch, torchvision) happen inside the commands so that
``imgcls --help`` stays fast. Results go to stdout, progress and logs to
stderr. Exit codes: 0 ok, 1 failure, 2 bad usage/input, 3 partial, 130 Ctrl-C.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
from pathlib import Path
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

_state = {"debug": False}


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _stdout():
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True)


def _error(message: str) -> None:
    """One line on stderr, whatever the terminal width."""
    from rich.markup import escape

    _stderr().print(f"[red]error:[/red] {escape(message)}")


def hold_sigint() -> None:
    """Block Ctrl-C (SIGINT) at the OS level until :func:`release_sigint`.

    A SIGINT in the middle of torch's import can abort in C++ (exit 134),
    leave half-initialised modules behind (an ImportError or RecursionError
    on the next import), or be swallowed by click ("Aborted!", exit 1). Held,
    it stays pending and is raised as a plain KeyboardInterrupt at the safe
    point where it is released."""
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def release_sigint() -> None:
    """Unblock SIGINT; one that arrived while held is raised here."""
    if hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def command(fn):
    """Turn library errors into one line on stderr and the right exit code.
    ``--debug`` adds the traceback; the exit code stays the error's."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            hold_sigint()
            try:
                import torch  # noqa: F401  (the slow, fragile import, done while Ctrl-C is held)
            finally:
                release_sigint()  # a Ctrl-C held meanwhile is raised here, inside this try
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
            _stderr().print("interrupted", markup=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # an unexpected failure: still one line
            _traceback_if_debug()
            hint = "" if _state["debug"] else " (run with --debug for the traceback)"
            _error(f"{type(exc).__name__}: {exc}{hint}")
            raise typer.Exit(EXIT_FAILURE) from None

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


def _shape_option(value: str | None):
    if value is None:
        return None
    from imgcls.recipe import parse_shape

    try:
        return parse_shape(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


# --------------------------------------------------------------------------- train


@app.command()
@command
def train(
    recipe: Annotated[
        Path | None, typer.Argument(help="The recipe YAML (optional with --resume: the run's own).")
    ] = None,
    set_: Annotated[
        list[str], typer.Option("--set", help="Override a recipe value: key.path=value (repeatable).")
    ] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Same as --set train.epochs=N.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder to create (default runs/<name>/<n>); must be new or empty."),
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

    if set_ is None:
        set_ = []
    overrides = list(set_)
    if epochs is not None:
        overrides.append(f"train.epochs={epochs}")
    if device is not None:
        overrides.append(f"train.device={device}")
    if recipe is None and resume is None:
        raise typer.BadParameter("give a recipe file, or --resume RUN_FOLDER")
    if resume is not None and out is not None:
        raise typer.BadParameter("--out makes a new run; --resume continues one: give one of them")
    if recipe is None:
        recipe_path = resume / "recipe.yaml"
        if not recipe_path.is_file():
            from imgcls.errors import UsageError

            raise UsageError(f"{resume}: not a run folder (no recipe.yaml)")
    else:
        recipe_path = recipe
    parsed = load_recipe(recipe_path, overrides)
    if nproc is not None:
        from imgcls.distributed import check_launch, launch

        check_launch(nproc, parsed)
        worker = ["--debug"] if _state["debug"] else []
        worker += ["train", str(recipe_path), *(f"--set={o}" for o in overrides)]
        worker += [f"--out={out}"] if out is not None else []
        worker += [f"--resume={resume}"] if resume is not None else []
        worker += ["--quiet"] if quiet else []
        worker += ["--json"] if as_json else []
        raise typer.Exit(launch(worker, nproc, max_restarts=max_restarts, port=port))
    if max_restarts or port is not None:
        raise typer.BadParameter("--max-restarts and --port go with --nproc (torchrun has its own)")
    from imgcls.distributed import launched
    from imgcls.train import train as run_training

    rank = int(os.environ.get("RANK", "0")) if launched() else 0

    log = (lambda message: None) if quiet else (lambda message: _stderr().print(message, markup=False))
    try:
        result = run_training(
            parsed,
            base_dir=recipe_path.parent,
            out=out,
            resume=resume,
            log=log,
            progress=not quiet and sys.stderr.isatty(),
        )
    except ImgclsError as exc:
        if rank == 0:
            raise
        from imgcls.errors import Interrupted

        # rank 0 says it once: Ctrl-C, and bad input (every rank reads the same recipe)
        if isinstance(exc, Interrupted) or exc.exit_code == 2:
            raise typer.Exit(exc.exit_code) from None
        error = ImgclsError(f"rank {rank}: {exc}")
        error.exit_code = exc.exit_code
        raise error from None
    except KeyboardInterrupt:
        if rank == 0:
            raise
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if rank != 0:  # rank 0 reports the run
        return
    summary = _train_summary(result)
    print(json.dumps(summary) if as_json else _train_closing(summary))


def _train_summary(result) -> dict:
    """The train command's result for --json (val_f1 on multi-label runs)."""
    best = result.best
    return {
        "run_dir": str(result.run_dir),
        "epochs": len(result.history),
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        **{k: best[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc", "val_f1") if k in best},
    }


def _train_closing(summary: dict) -> str:
    """The closing lines; a multi-label run's best epoch was chosen on val_f1, so it leads."""
    text = f"best epoch {summary['best_epoch']}"
    if "val_f1" in summary:
        text += f": val_f1 {summary['val_f1']:.4f}, val_acc (exact match) {summary['val_acc']:.4f}"
        text += f", val_loss {summary['val_loss']:.4f}"
    elif "val_acc" in summary:
        text += f": val_acc {summary['val_acc']:.4f}, val_loss {summary['val_loss']:.4f}"
    return f"{text}\nrun folder: {summary['run_dir']}"


# --------------------------------------------------------------------------- summarize


@app.command()
@command
def summarize(
    target: Annotated[
        str,
        typer.Argument(
            help="A recipe file, a run folder or checkpoint, or an architecture name (see `imgcls models`)."
        ),
    ],
    input: Annotated[
        str | None,
        typer.Option("--input", "-i", help="Input shape CxHxW, e.g. 3x224x224 (HxW alone means 3 channels)."),
    ] = None,
    classes: Annotated[int | None, typer.Option("--classes", "-c", min=1, help="Number of classes.")] = None,
    depth: Annotated[
        int | None, typer.Option("--depth", "-d", min=0, help="Fold modules nested deeper than N.")
    ] = None,
    set_: Annotated[
        list[str], typer.Option("--set", help="Override a recipe value: key.path=value (repeatable).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Layer-by-layer output shapes, parameters and MACs, without allocating weights.

    Examples:

        imgcls summarize vgg16

        imgcls summarize resnet18 --input 1x64x64 --classes 10 --depth 2

        imgcls summarize recipes/quickstart.yaml --json
    """
    from imgcls.summary import summarize_target, summary_table, totals_lines

    if set_ is None:
        set_ = []
    summary = summarize_target(target, _shape_option(input), classes, overrides=set_)
    if depth is not None:
        summary = summary.fold(depth)
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2))
        return
    out = _stdout()
    out.print(summary_table(summary))
    for line in totals_lines(summary):
        out.print(line)


# --------------------------------------------------------------------------- compare


@app.command()
@command
def compare(
    targets: Annotated[list[str], typer.Argument(help="Architecture names or recipe files.")],
    input: Annotated[
        str | None, typer.Option("--input", "-i", help="One input shape CxHxW for all (default: each its own).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write accuracy vs MACs (PNG), bubble = params.")] = None,
) -> None:
    """Networks side by side: year, paper, params, MACs, memory, depth, ImageNet top-1.

    Examples:

        imgcls compare alexnet vgg16 googlenet resnet50 densenet121 mobilenet_v2

        imgcls compare resnet50 recipes/architectures/seresnet50.yaml --csv

        imgcls compare alexnet vgg16 resnet50 mobilenet_v2 --plot compare.png
    """
    from imgcls import compare as cmp

    if as_json and as_csv:
        raise typer.BadParameter("give --json or --csv, not both")
    entries = cmp.compare(targets, _shape_option(input))
    if plot is not None:
        left_out = cmp.plot(entries, plot)
        if left_out:
            _stderr().print(f"not plotted (no top-1): {', '.join(left_out)}", markup=False)
    if as_json:
        print(cmp.to_json(entries))
    elif as_csv:
        print(cmp.to_csv(entries), end="")
    else:
        _stdout().print(cmp.table(entries))


# --------------------------------------------------------------------------- models


@app.command()
@command
def models(
    pattern: Annotated[str, typer.Argument(help="Wildcard filter, e.g. 'resnet*' or 'timm/vit*'.")] = "*",
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """List the named architectures `model: {arch: NAME}` accepts.

    Examples:

        imgcls models

        imgcls models 'efficientnet*'
    """
    from imgcls.models.zoo import list_archs

    names = list_archs(pattern)
    if as_json:
        print(json.dumps(names))
    else:
        for name in names:
            print(name)
    if not names:
        _stderr().print(f"no architecture matches '{pattern}' (see `imgcls models`)", markup=False)


# --------------------------------------------------------------------------- data


@data_app.command("shapes")
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
    _stderr().print(f"wrote {path}")


@data_app.command("check")
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
    from imgcls.data.check import check_dataset, summary_lines
    from imgcls.errors import EXIT_PARTIAL

    ckpt = None
    if model is not None:
        from imgcls.checkpoint import load_checkpoint

        ckpt = load_checkpoint(model)
    result = check_dataset(path, model=ckpt, log=lambda message: _stderr().print(message, markup=False))
    if ckpt is not None and ckpt.run_dir is not None:
        from imgcls.checkpoint import write_text_atomic

        write_text_atomic(ckpt.run_dir / "data-check.json", json.dumps(result.to_dict(), indent=1) + "\n")
    if as_json:
        print(json.dumps(result.to_dict()), flush=True)
    else:
        print("\n".join(summary_lines(result)), flush=True)
    if not result.clean:
        raise typer.Exit(EXIT_PARTIAL)


# --------------------------------------------------------------------------- cache

cache_app = typer.Typer(
    help="The decoded-image cache ($IMGCLS_CACHE/decoded, capped by IMGCLS_CACHE_MAX).", no_args_is_help=True
)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
@command
def cache_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON list on stdout.")] = False,
) -> None:
    """List cached decoded splits, most recently used first.

    Examples:

        imgcls cache list

        imgcls cache list --json
    """
    import datetime

    from imgcls.data.cache import cache_max, default_cache_dir, human_bytes, list_entries

    entries = list_entries()
    if as_json:
        print(json.dumps(entries, indent=2))
        return
    from rich.table import Table

    table = Table()
    table.add_column("key", no_wrap=True)
    for name in ("source", "split", "images", "size", "last used"):
        table.add_column(name)
    for e in entries:
        used = datetime.datetime.fromtimestamp(e["last_used"]).strftime("%Y-%m-%d %H:%M")
        table.add_row(e["key"], e["source"], e["split"], str(e["images"]), human_bytes(e["bytes"]), used)
    _stdout().print(table)
    total = sum(e["bytes"] for e in entries)
    _stderr().print(
        f"{len(entries)} entries, {human_bytes(total)} of {human_bytes(cache_max())} (IMGCLS_CACHE_MAX) in {default_cache_dir()}",
        markup=False,
    )


@cache_app.command("clear")
@command
def cache_clear(
    keys: Annotated[
        list[str] | None, typer.Argument(help="Entry keys (or unique prefixes) to remove.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="Remove every entry.")] = False,
) -> None:
    """Remove cached decoded splits (named ones, or --all); the next run decodes again.

    Examples:

        imgcls cache clear --all

        imgcls cache clear 3f9a1c
    """
    from imgcls.data.cache import clear_entries, default_cache_dir, human_bytes
    from imgcls.errors import UsageError

    if bool(keys) == all_:
        raise UsageError("name entry keys to remove, or pass --all (not both)")
    removed, freed = clear_entries(keys or ())
    _stderr().print(
        f"removed {removed} cache entries, freed {human_bytes(freed)} in {default_cache_dir()}", markup=False
    )


# --------------------------------------------------------------------------- evaluate


@app.command()
@command
def evaluate(
    target: Annotated[str, typer.Argument(help="A run folder or a .safetensors checkpoint.")],
    data: Annotated[
        Path | None,
        typer.Argument(
            help="Labelled images: a folder of class folders (or its test/ or val/), or a CSV. Default: the run's own test or val split."
        ),
    ] = None,
    top_k: Annotated[
        int, typer.Option("--top-k", min=1, help="k for top-k accuracy (capped at the class count).")
    ] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 128,
    out: Annotated[
        Path | None, typer.Option(help="Folder for confusion.png and metrics.json (default <run>/eval/).")
    ] = None,
    misclassified: Annotated[
        Path | None,
        typer.Option(help="Write file,true,predicted,confidence of each wrong image to this CSV."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    explain: Annotated[
        bool, typer.Option("--explain", help="Overlay Grad-CAM heatmaps on the error gallery.")
    ] = False,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta",
            help="Also report the metrics with test-time augmentation (logits averaged with the flipped image).",
        ),
    ] = False,
    tune_thresholds: Annotated[
        bool,
        typer.Option(
            "--tune-thresholds",
            help="Multi-label: pick each class's F1-optimal threshold on the run's validation split, "
            "write them into <checkpoint>-tuned.safetensors and evaluate with them.",
        ),
    ] = False,
) -> None:
    """Accuracy, top-k, loss, per-class precision/recall/F1 and the confusion matrix.

    Multi-label models: per-class precision/recall/F1/AP at each class's
    threshold, micro and macro F1, mAP and the exact-match ratio.

    The confusion matrix is always saved as a PNG in the output folder.
    Unreadable images are skipped: the report covers the others and the exit
    code is 3 (2 when none could be read).

    Examples:

        imgcls evaluate runs/quickstart/1

        imgcls evaluate runs/quickstart/1/best.safetensors ~/pets/test --misclassified wrong.csv

        imgcls evaluate runs/quickstart/1 labels.csv --json
    """
    from imgcls.evaluate import evaluate as run_evaluate
    from imgcls.evaluate import report_renderables

    log = lambda message: _stderr().print(message, markup=False)  # noqa: E731
    result = run_evaluate(
        target,
        data,
        top_k=top_k,
        batch_size=batch_size,
        out=out,
        misclassified=misclassified,
        log=log,
        explain=explain,
        tta=tta,
        tune_thresholds=tune_thresholds,
    )
    if as_json:
        print(json.dumps(result.to_dict()), flush=True)
    else:
        console = _stdout()
        for renderable in report_renderables(result):
            console.print(renderable)
    result.raise_if_skipped()  # exit 3 once the report is out


# --------------------------------------------------------------------------- predict


@app.command()
@command
def predict(
    paths: Annotated[
        list[str],
        typer.Argument(
            help="Image files, folders (recursive), patterns like 'photos/*.jpg', or - for names on stdin."
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            "-m",
            help="Run folder, .safetensors checkpoint, or exported .onnx/.pt/.ts (default: newest run under ./runs).",
        ),
    ] = None,
    arch: Annotated[
        str | None, typer.Option(help="A torchvision architecture, with --pretrained: ImageNet labels.")
    ] = None,
    pretrained: Annotated[
        bool, typer.Option("--pretrained", help="Use the torchvision weights of --arch (downloaded once).")
    ] = False,
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", min=1, help="Labels per file (capped at the class count).")
    ] = 3,
    threshold: Annotated[
        float | None,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Mark files whose top probability is below this as unsure. Multi-label models: "
            "the probability a label needs, for every class (instead of the model's thresholds).",
        ),
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Images per forward pass.")] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="CSV with a header row.")] = False,
    tta: Annotated[
        bool,
        typer.Option(
            "--tta", help="Test-time augmentation: average the logits with the left-right flipped image."
        ),
    ] = False,
) -> None:
    """Top-k labels for each image file.

    Unreadable files get an error line on stderr (and an error record in
    --json/--csv); the others are still predicted, and the exit code is 3
    (2 when none of the files could be read).

    Examples:

        imgcls predict photo.jpg other/*.png --model runs/quickstart/1

        imgcls predict ~/photos --json > labels.jsonl

        find . -name '*.jpg' | imgcls predict - --csv --top-k 1

        imgcls predict cat.jpg --arch resnet18 --pretrained
    """
    import csv

    from rich.table import Table

    from imgcls.errors import PartialFailure, UsageError
    from imgcls.predict import Failure
    from imgcls.predict import predict as run_predict

    if as_json and as_csv:
        raise UsageError("choose one of --json and --csv")
    err = _stderr()
    predictor, records = run_predict(
        paths,
        model=model,
        arch=arch,
        pretrained=pretrained,
        batch_size=batch_size,
        top_k=top_k,
        threshold=threshold,
        log=lambda message: err.print(message, markup=False),
        tta=tta,
    )
    if predictor.task == "multilabel":
        # CSV in the training CSV's own syntax (labels joined by ';'), so output can be corrected and trained on
        header = ["file", "labels", "probabilities"]

        def csv_cells(r):
            return [r.label, ";".join(f"{p:.6f}" for _, p in r.labels)]

        def table(rows):
            t = Table()
            t.add_column("file", overflow="fold")
            t.add_column("labels (probability)")
            for r in rows:
                t.add_row(
                    r.file, ", ".join(f"{label} {p:.3f}" for label, p in r.labels) or "[dim](none)[/dim]"
                )
            return t

    else:
        k = max(1, min(top_k, len(predictor.classes)))
        header = ["file", "label", "confidence", "unsure"]
        header += [col for i in range(2, k + 1) for col in (f"label_{i}", f"p_{i}")]

        def csv_cells(r):
            extra = [v for label, p in r.top_k[1:] for v in (label, f"{p:.6f}")]
            extra += [""] * (2 * (k - 1) - len(extra))
            return [r.label, f"{r.confidence:.6f}", str(r.unsure).lower(), *extra]

        def table(rows):
            t = Table()
            t.add_column("file", overflow="fold")
            t.add_column("label")
            t.add_column("p", justify="right")
            if k > 1:
                t.add_column(f"next {k - 1}")
            t.add_column("")
            for r in rows:
                cells = [r.file, r.label, f"{r.confidence:.3f}"]
                if k > 1:
                    cells.append(", ".join(f"{label} {p:.3f}" for label, p in r.top_k[1:]))
                cells.append("[yellow]unsure[/yellow]" if r.unsure else "")
                t.add_row(*cells)
            return t

    total = failed = 0
    writer = csv.writer(sys.stdout, lineterminator="\n") if as_csv else None
    if writer is not None:
        writer.writerow([*header, "error"])
    rows = []
    for record in records:
        total += 1
        if isinstance(record, Failure):
            failed += 1
            err.print(f"error: {record.file}: {record.error}", markup=False)
        if as_json:
            print(json.dumps(record.to_dict()), flush=True)
        elif writer is not None:
            if isinstance(record, Failure):
                writer.writerow([record.file, *[""] * (len(header) - 1), record.error])
            else:
                writer.writerow([record.file, *csv_cells(record), ""])
            sys.stdout.flush()
        elif not isinstance(record, Failure):
            rows.append(record)
    if rows:
        _stdout().print(table(rows))
    if failed == total:
        raise UsageError(f"none of the {total} files could be read")
    if failed:
        raise PartialFailure(f"{failed} of {total} files could not be read (the others were predicted)")


# --------------------------------------------------------------------------- export


@app.command()
@command
def export(
    target: Annotated[
        str, typer.Argument(help="A run folder, runs/<name> (its latest run) or a .safetensors checkpoint.")
    ],
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format", "-f", help="onnx, torchscript or safetensors (default: from --out's suffix)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="File to write (default: beside the checkpoint, e.g. <run>/model.onnx)."),
    ] = None,
    opset: Annotated[
        int | None, typer.Option(min=7, help="ONNX opset version (default: the exporter's).")
    ] = None,
    dynamic_batch: Annotated[
        bool,
        typer.Option(
            "--dynamic-batch/--static-batch", help="Leave the batch size free, or fix it to --batch-size."
        ),
    ] = True,
    batch_size: Annotated[int, typer.Option(min=1, help="The batch size of a --static-batch export.")] = 1,
    image: Annotated[
        list[Path] | None,
        typer.Option("--image", help="An image file or folder to check the export on (repeatable)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option("--force", help="Replace an existing file (only once the new export passed its check)."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a model file for other runtimes, checked against PyTorch first.

    The export is run (onnxruntime, torch.jit.load, safetensors) on check
    images: yours (--image), a few of the run's own when they are on disk,
    and fixed noise. It is kept only if its outputs match PyTorch's; class
    names and preprocessing travel inside the file.

    Examples:

        imgcls export runs/quickstart/1 --format onnx

        imgcls export runs/quickstart/1 --format torchscript --out deploy/model.pt

        imgcls export runs/quickstart --format onnx --static-batch --batch-size 8 --opset 17

        imgcls export best.safetensors --out model.onnx --image photos/ --json
    """
    from imgcls.export import export_model

    log = (lambda message: None) if quiet else (lambda message: _stderr().print(message, markup=False))
    result = export_model(
        target,
        fmt,
        out,
        opset=opset,
        dynamic_batch=dynamic_batch,
        batch_size=batch_size,
        force=force,
        images=image or [],
        log=log,
    )
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    checks = result.checks
    details = [result.exporter]
    if result.opset is not None:
        details.append(f"opset {result.opset}")
    if result.format != "safetensors":
        details.append("dynamic batch" if result.dynamic_batch else f"batch {result.batch_size}")
    print(f"wrote {result.path} ({', '.join(details)})")
    print(
        f"matches PyTorch on {checks[0].images} images at batch size "
        f"{' and '.join(str(c.batch_size) for c in checks)}: "
        f"max |logit diff| {max(c.max_logit_diff for c in checks):.2g}, "
        f"max |prob diff| {max(c.max_prob_diff for c in checks):.2g}"
    )


# --------------------------------------------------------------------------- explain


@app.command()
@command
def explain(
    images: Annotated[list[Path], typer.Argument(help="Image files to explain.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model", "-m", help="Run folder or .safetensors checkpoint (default: newest run under ./runs)."
        ),
    ] = None,
    method: Annotated[str, typer.Option(help="gradcam, gradcam++ or layercam.")] = "gradcam",
    layer: Annotated[
        str | None,
        typer.Option(
            help="Layer to explain, named as `imgcls summarize` names it (default: the last conv block)."
        ),
    ] = None,
    target: Annotated[
        list[str],
        typer.Option(help="Class to explain (name or index; repeatable). Default: the predicted class."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the PNGs (default <run>/explain/).")] = None,
    filters: Annotated[
        bool, typer.Option("--filters", help="Also draw the first-layer filters as a grid.")
    ] = False,
    maps: Annotated[
        str | None,
        typer.Option("--maps", metavar="LAYER", help="Also draw each image's feature maps at LAYER."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Class-activation heatmaps: where in each image the model looked.

    One PNG per image (and per --target class) with the heatmap over the
    image as the model sees it. --json gives, per image, the predicted class,
    its probability, the heatmap's peak (pixels and fractions of the frame)
    and the share of the frame above half the peak. Unreadable images are
    skipped: exit 3 (2 when none could be read).

    Examples:

        imgcls explain photo.jpg --model runs/quickstart/1

        imgcls explain a.png b.png --method layercam --layer conv3 --target circle --json

        imgcls explain photo.jpg --filters --maps conv1
    """
    from imgcls.checkpoint import latest_run, load_checkpoint
    from imgcls.explain import explain as run_explain

    err = _stderr()
    if model is None:
        model = str(latest_run())
        err.print(f"model: {model} (the most recent run; choose another with --model)", markup=False)
    result = run_explain(
        images,
        load_checkpoint(model),
        method=method,
        layer=layer,
        targets=target or [],
        out=out,
        filters=filters,
        maps=maps,
        log=lambda message: err.print(message, markup=False),
    )
    if as_json:
        print(json.dumps(result.to_dict()), flush=True)
    else:
        print(f"{result.method} at layer {result.layer}; pictures in {result.out_dir}")
        for e in result.images:
            for t in e.targets:
                peak = t["peak"]
                print(
                    f"{e.file}: predicted {e.predicted} ({e.probability:.3f}); {t['class']}: "
                    f"peak at x={peak['x']} y={peak['y']}, {t['area_above_half_max']:.1%} of the frame "
                    f"above half max -> {t['overlay']}"
                )
            if e.maps:
                print(f"{e.file}: feature maps -> {e.maps}")
        if result.filters:
            print(f"first-layer filters -> {result.filters}")
    result.raise_if_skipped()


# --------------------------------------------------------------------------- report


@app.command()
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


# --------------------------------------------------------------------------- tune


@app.command()
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
        str | None, typer.Option(help="Study name and folder (default: <recipe name>-tune).")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(min=0.0, help="Start no new trial after this many seconds.")
    ] = None,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=1, help="Trials at once, in threads of this process.")
    ] = 1,
    metric: Annotated[
        str, typer.Option(help="The objective: val_acc (maximised), val_loss, train_acc or train_loss.")
    ] = "val_acc",
    pruner: Annotated[str, typer.Option(help="median, hyperband or none.")] = "median",
    startup_trials: Annotated[
        int, typer.Option(min=0, help="Median pruner: trials that run in full before any is pruned.")
    ] = 2,
    set_: Annotated[
        list[str], typer.Option("--set", help="Override a recipe value for every trial: key.path=value.")
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

    err = _stderr()
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
        log=lambda message: err.print(message, markup=False),
    )
    if as_json:
        print(json.dumps(result.to_dict()))
    else:
        from rich.table import Table

        keys = sorted({k for t in result.trials for k in t.params})
        table = Table(title=f"study {result.study}: {result.metric} ({result.direction})")
        for col in ("trial", "state", result.metric, "epochs", "seconds", *keys):
            table.add_column(col, justify="left" if col == "state" else "right")
        for t in result.trials:
            table.add_row(
                str(t.number),
                t.state,
                "-" if t.value is None else f"{t.value:.4f}",
                str(t.epochs),
                "-" if t.seconds is None else f"{t.seconds:.1f}",
                *("-" if t.params.get(k) is None else _short(t.params[k]) for k in keys),
            )
        out = _wide_stdout()
        out.print(table)
        if result.best is not None:
            out.print(
                f"best: trial {result.best.number}, {result.metric} {result.best.value:.4f}, run {result.best.run_dir}"
            )
        for label, path in (("best recipe", result.best_yaml), ("importance", result.importance_png)):
            if path is not None:
                out.print(f"{label}: {path}")
    if result.interrupted:
        from imgcls.errors import Interrupted

        raise Interrupted(f"stopped by Ctrl-C; rerun the same command to continue study '{result.study}'")


def _wide_stdout():
    """A wide table stays whole when piped (rich would squeeze it to 80 columns)."""
    from rich.console import Console

    return Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 250)


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# --------------------------------------------------------------------------- runs


@app.command()
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

    from imgcls.errors import UsageError
    from imgcls.runs import COLUMNS, diff_runs, fmt, list_runs

    if as_json and as_csv:
        raise UsageError("choose one of --json and --csv")
    if diff is not None:
        result = diff_runs(*diff)
        if as_json:
            print(json.dumps(result))
            return
        if as_csv:
            writer = csv.writer(sys.stdout, lineterminator="\n")
            writer.writerow(["section", "key", "a", "b"])
            for r in result["recipe"]:
                writer.writerow(["recipe", r["key"], r["a"], r["b"]])
            for r in result["metrics"]:
                writer.writerow(["metric", r["metric"], r["a"], r["b"]])
            return
        from rich.table import Table

        out = _stdout()
        table = Table(title="recipe")
        for col in ("key", str(diff[0]), str(diff[1])):
            table.add_column(col, overflow="fold")
        for r in result["recipe"]:
            table.add_row(
                r["key"], "-" if r["a"] is None else str(r["a"]), "-" if r["b"] is None else str(r["b"])
            )
        if result["recipe"]:
            out.print(table)
        else:
            out.print("recipes: identical")
        table = Table(title="metrics")
        for col in ("metric", str(diff[0]), str(diff[1])):
            table.add_column(col, justify="left" if col == "metric" else "right")
        for r in result["metrics"]:
            table.add_row(r["metric"], fmt(r["metric"], r["a"]), fmt(r["metric"], r["b"]))
        out.print(table)
        return
    rows = list_runs(root, sort)
    if as_json:
        print(json.dumps(rows))
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    elif not rows:
        _stderr().print(f"no runs under {root}", markup=False)
    else:
        from rich.table import Table

        table = Table()
        for col in COLUMNS:
            table.add_column(
                col, justify="left" if col in ("run", "date", "arch", "device", "precision") else "right"
            )
        for r in rows:
            table.add_row(*(fmt(c, r[c]) for c in COLUMNS))
        _wide_stdout().print(table)


def main() -> None:
    hold_sigint()  # released once torch is imported (in `command`), or when app() returns
    try:
        try:
            app()
        finally:
            release_sigint()
    except BrokenPipeError:
        # the reader went away (`imgcls ... | head`): stop quietly, as cat does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(EXIT_FAILURE)
    except KeyboardInterrupt:
        # Ctrl-C outside a command (while parsing, while importing the CLI)
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
