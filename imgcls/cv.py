"""``imgcls cv``: K-fold cross-validation of a recipe; each fold a normal run folder.

::

    runs/<name>/cv-<n>/           the parent (train.out / recipe name / cv-<n>, or --out)
        cv.json                   the options, the fold sizes, each finished fold's best
                                  epoch and metrics, their mean / std / min / max, the final run
        cv-recipe.yaml            the resolved recipe with data.cv {folds, fold: all, grouping}
        fold-1/ ... fold-K/       normal run folders: recipe.yaml holds data.cv.fold = i, so
                                  ``imgcls evaluate`` and ``imgcls train --resume`` work on them
        final/                    (--final) every image trains, for the mean best epoch

The split is :mod:`imgcls.data.folds` (stratified, grouped, seeded by
``data.split_seed``) applied where every run reads its data
(:func:`imgcls.data.sources.open_source`), so a fold folder alone says what
it trained and validated on.

Resumable: cv.json is rewritten after each fold. ``imgcls cv --resume
PARENT`` skips the finished folds, resumes a stopped one from its last
checkpoint, and starts the rest. Ctrl-C stops the running fold as
``imgcls train`` stops (state saved) and exits 130.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from imgcls import checkpoint as ck
from imgcls import interrupts
from imgcls.errors import DataError, ImgclsError, Interrupted, UsageError
from imgcls.io import write_text_atomic
from imgcls.recipe import CVSpec, Recipe, dump_yaml, load_recipe, recipe_from_dict, recipe_to_dict

CV_JSON = "cv.json"
CV_RECIPE = "cv-recipe.yaml"
FINAL = "final"
Log = Callable[[str], None]


@dataclass
class Plan:
    """One cross-validation: where it lives, what it runs, what it has done (cv.json)."""

    parent: Path
    recipe: Recipe  # resolved paths; data.cv with fold: all
    doc: dict[str, Any] = field(default_factory=dict)

    @property
    def folds(self) -> int:
        return int(self.doc["folds"])

    def fold_dir(self, fold: int | str) -> Path:
        return self.parent / (FINAL if fold == "all" else f"fold-{fold}")

    def done(self) -> dict[int, dict]:
        return {int(r["fold"]): r for r in self.doc["runs"]}

    def save(self) -> None:
        self.doc["summary"] = summarize(self.doc["runs"])
        self.doc["complete"] = len(self.doc["runs"]) == self.folds and (
            not self.doc["final"] or self.doc.get("final_run") is not None
        )
        write_text_atomic(self.parent / CV_JSON, json.dumps(self.doc, indent=2) + "\n")


def start(
    recipe: Recipe,
    *,
    base_dir: Path,
    folds: int,
    group_by: str | None = None,
    group_by_folder: int | None = None,
    final: bool = False,
    out: Path | None = None,
    log: Log = lambda message: None,
) -> Plan:
    """Check the split (before any folder is made), then make the parent folder and its cv.json."""
    if folds < 2:
        raise UsageError(f"--folds {folds}: cross-validation needs 2 folds or more")
    if group_by_folder is not None and group_by_folder < 1:
        raise UsageError(
            f"--group-by-folder {group_by_folder}: give a level of 1 or more (1: the folders right under each class)"
        )
    if group_by is not None and group_by_folder is not None:
        raise UsageError("give one of --group-by (a CSV column) and --group-by-folder (a folder level)")
    resolved = _resolved(recipe, base_dir)
    data = resolved["data"]
    cv = {"folds": folds, "fold": "all", "group_by": group_by, "group_by_folder": group_by_folder}
    if group_by is not None and data["source"] != "csv":
        raise UsageError(
            f"--group-by {group_by}: names a CSV column, but data.source is {data['source']} "
            "(for folder data: --group-by-folder DEPTH)"
        )
    if group_by_folder is not None and data["source"] == "csv":
        raise UsageError(
            "--group-by-folder is for folder data; a CSV names its groups in a column (--group-by)"
        )
    data["cv"] = cv
    cv_recipe = recipe_from_dict(resolved)
    sizes = fold_sizes(cv_recipe, log)
    interrupts.check()  # before the folder is made
    parent = out if out is not None else ck.new_run_dir(Path(recipe.train.out), recipe.name, prefix="cv-")
    if out is not None:
        ck.claim_out_dir(out)
    doc = {
        "recipe_name": recipe.name,
        "folds": folds,
        "group_by": group_by,
        "group_by_folder": group_by_folder,
        "split_seed": recipe.data.split_seed,
        "final": final,
        "base_dir": str(base_dir.resolve()),
        "sizes": sizes,
        "runs": [],
        "final_run": None,
    }
    plan = Plan(parent, cv_recipe, doc)
    try:
        write_text_atomic(parent / CV_RECIPE, dump_yaml(cv_recipe))
        plan.save()
    except BaseException:
        _remove_parent(plan)
        raise
    log(f"cross-validation: {parent} ({folds} folds{_grouping(doc)})")
    return plan


def _resolved(recipe: Recipe, base_dir: Path) -> dict:
    """The recipe as plain data, with data.path and model.weights absolute (as a run folder keeps them)."""
    from imgcls.data.sources import resolve

    resolved = recipe_to_dict(recipe)
    if recipe.data.path:
        resolved["data"]["path"] = str(resolve(recipe.data.path, base_dir).resolve())
    weights = recipe.model.weights
    if weights and resolve(weights, base_dir).exists():
        resolved["model"]["weights"] = str(resolve(weights, base_dir).resolve())
    return resolved


def _grouping(doc: dict) -> str:
    if doc["group_by"] is not None:
        return f", grouped by column '{doc['group_by']}'"
    if doc["group_by_folder"] is not None:
        return f", grouped by sub-folder level {doc['group_by_folder']}"
    return ""


def fold_sizes(cv_recipe: Recipe, log: Log) -> list[dict]:
    """(train, val) images per fold, from the listing alone (no decoding); a
    fold with no validation image is refused here, before any training."""
    from imgcls.data.folds import fold_array
    from imgcls.data.sources import open_source

    spec = cv_recipe.data
    assert spec.cv is not None
    pool = open_source(spec, ".", log=log)  # fold: all, so train is the whole pool
    fold = fold_array(pool, spec.cv, spec.split_seed, log)
    sizes = []
    for i in range(spec.cv.folds):
        val = int((fold == i).sum())
        if val == 0:
            raise DataError(
                f"{pool.root}: fold {i + 1} of {spec.cv.folds} gets no image (too few groups); "
                "use fewer --folds"
            )
        sizes.append({"fold": i + 1, "train": len(fold) - val, "val": val})
    return sizes


def open_plan(parent: Path) -> Plan:
    """A cross-validation folder made by :func:`start`, to continue or show."""
    from imgcls.runs import RunFileError, read_json_file

    try:
        doc = read_json_file(parent / CV_JSON)
    except RunFileError as exc:
        raise UsageError(str(exc)) from None
    if doc is None:
        raise UsageError(f"{parent}: not a cross-validation folder (no {CV_JSON})")
    missing = [k for k in ("folds", "runs", "final", "base_dir") if k not in doc]
    if missing:
        raise UsageError(f"{parent / CV_JSON}: no '{missing[0]}' (not a cv.json imgcls wrote)")
    return Plan(parent, load_recipe(parent / CV_RECIPE), doc)


def run(
    plan: Plan,
    *,
    nproc: int | None = None,
    log: Log = lambda message: None,
    progress: bool = False,
    train_fold: Callable[..., None] | None = None,
) -> dict:
    """Train every fold not yet finished, then (when asked) the final run; cv.json
    after each. ``train_fold(recipe, base_dir, out, resume)`` trains one run
    (default: in this process, or ``nproc`` processes). Returns cv.json's content."""
    train_fold = train_fold or _trainer(plan, nproc, log, progress)
    try:
        with ck.holding_runs():
            # one cross-validation writes cv.json at a time
            ck.hold_run(plan.parent, "continue it once that has finished")
            _run(plan, train_fold, log)
    except KeyboardInterrupt:  # between folds (a Ctrl-C in a fold stops it as imgcls train stops)
        raise Interrupted(
            f"interrupted after {len(plan.doc['runs'])} of {plan.folds} folds; finished folds are kept. "
            f"Continue with: imgcls cv --resume {plan.parent}"
        ) from None
    return plan.doc


def _run(plan: Plan, train_fold: Callable[..., None], log: Log) -> None:
    done = plan.done()
    for i in range(1, plan.folds + 1):
        if i in done:
            continue
        interrupts.check()  # between folds: stop before the next one starts
        size = plan.doc["sizes"][i - 1]
        log(f"fold {i}/{plan.folds}: {size['train']} train, {size['val']} val images -> {plan.fold_dir(i)}")
        _train_one(plan, i, train_fold)
        plan.doc["runs"].append(fold_result(plan.fold_dir(i), i))
        plan.save()
    if plan.doc["final"] and plan.doc.get("final_run") is None:
        interrupts.check()
        epochs = final_epochs(plan.doc["runs"])
        log(
            f"final: every image trains, {epochs} epochs (the folds' mean best epoch) -> {plan.fold_dir('all')}"
        )
        _train_one(plan, "all", train_fold, epochs)
        plan.doc["final_run"] = {"run_dir": FINAL, "epochs": epochs}
        plan.save()


def _train_one(
    plan: Plan, fold: int | str, train_fold: Callable[..., None], epochs: int | None = None
) -> None:
    """One fold (or the final run): resumed from its last checkpoint when it has one."""
    folder = plan.fold_dir(fold)
    resume = folder if (folder / ck.LAST).is_file() else None
    if resume is None and folder.is_dir():  # a start killed before its first checkpoint: start again
        ck.remove_unstarted_run(folder, False, ["recipe.yaml", "summary.txt", "summary.json", "run.json"])
    recipe = fold_recipe(plan.recipe, fold, epochs)
    started_empty = not plan.doc["runs"] and not any(
        (plan.fold_dir(i) / ck.LAST).is_file() for i in range(1, plan.folds + 1)
    )
    which = "the final run" if fold == "all" else f"fold {fold} of {plan.folds}"
    try:
        train_fold(recipe, Path(plan.doc["base_dir"]), None if resume else folder, resume)
    except (Interrupted, KeyboardInterrupt):
        if started_empty and not (folder / ck.LAST).is_file():
            _remove_parent(plan)  # nothing trained yet: leave nothing behind
            raise Interrupted("interrupted before the first fold saved anything; nothing was kept") from None
        raise Interrupted(
            f"interrupted in {which}; finished folds are kept. Continue with: imgcls cv --resume {plan.parent}"
        ) from None
    except BaseException:
        if started_empty and not (folder / ck.LAST).is_file():
            _remove_parent(plan)
        raise


def fold_recipe(cv_recipe: Recipe, fold: int | str, epochs: int | None = None) -> Recipe:
    """The recipe of one fold (``all``: the final run, for ``epochs`` epochs, no early stopping)."""
    assert cv_recipe.data.cv is not None
    cv = cv_recipe.data.cv.model_copy(update={"fold": fold})
    data = cv_recipe.data.model_copy(update={"cv": CVSpec.model_validate(cv.model_dump())})
    update: dict[str, Any] = {"data": data}
    if epochs is not None:
        update["train"] = cv_recipe.train.model_copy(update={"epochs": epochs, "early_stopping": None})
    return cv_recipe.model_copy(update=update)


def _trainer(plan: Plan, nproc: int | None, log: Log, progress: bool) -> Callable[..., None]:
    """How a fold trains: :func:`imgcls.training.train` here, or ``imgcls train`` in ``nproc`` processes."""
    if nproc is None:
        from imgcls.training import train

        def in_process(recipe: Recipe, base_dir: Path, out: Path | None, resume: Path | None) -> None:
            train(recipe, base_dir=base_dir, out=out, resume=resume, log=log, progress=progress)

        return in_process
    from imgcls.distributed import check_launch, launch

    check_launch(nproc, plan.recipe)

    def launched(recipe: Recipe, base_dir: Path, out: Path | None, resume: Path | None) -> None:
        assert recipe.data.cv is not None
        args = ["train", str(plan.parent / CV_RECIPE), f"--set=data.cv.fold={recipe.data.cv.fold}"]
        if recipe.data.cv.fold == "all":
            args += [f"--set=train.epochs={recipe.train.epochs}", "--set=train.early_stopping=null"]
        args += [f"--resume={resume}"] if resume is not None else [f"--out={out}", "--quiet"]
        with _stdout_to_stderr():
            code = launch(args, nproc)
        if code == 130:
            raise Interrupted("interrupted")
        if code:
            failed = ImgclsError(f"{out or resume}: the training processes failed (exit {code}, said above)")
            failed.exit_code = code
            raise failed

    return launched


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """While the fold's processes run, what they print to stdout (train's
    closing lines) goes to stderr with their logs: stdout keeps cv's result alone."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _remove_parent(plan: Plan) -> None:
    for name in (CV_JSON, CV_RECIPE):
        (plan.parent / name).unlink(missing_ok=True)
    try:
        plan.parent.rmdir()
    except OSError:
        pass


def fold_result(folder: Path, fold: int) -> dict:
    """A finished fold's best epoch and its metrics, read back from the run folder."""
    best, last = ck.read_meta(folder / ck.BEST), ck.read_meta(folder / ck.LAST)
    metrics = {k: v for k, v in (best.get("metrics") or {}).items() if k not in ("epoch", "lr")}
    return {
        "fold": fold,
        "run_dir": folder.name,
        "best_epoch": best.get("epoch"),
        "epochs": last.get("epoch"),
        "metrics": metrics,
    }


def final_epochs(runs: list[dict]) -> int:
    """The folds' mean best epoch, rounded (at least 1)."""
    best = [r["best_epoch"] for r in runs if r.get("best_epoch")]
    return max(1, round(statistics.fmean(best))) if best else 1


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per metric (and best_epoch): mean, std (sample, n-1), min, max and each fold's value."""
    names: list[str] = []
    for r in runs:
        names += [k for k in r["metrics"] if k not in names]
    order = sorted(names, key=lambda k: (not k.startswith("val_"), names.index(k)))
    out = {}
    for name in [*order, "best_epoch"]:
        values = [r["best_epoch"] if name == "best_epoch" else r["metrics"].get(name) for r in runs]
        present = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
        if not present:
            continue
        out[name] = {
            "mean": statistics.fmean(present),
            "std": statistics.stdev(present) if len(present) > 1 else 0.0,
            "min": min(present),
            "max": max(present),
            "values": values,
        }
    return out
