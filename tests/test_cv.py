"""`imgcls cv`: K-fold cross-validation, grouped folds, resume, `runs` grouping, --final.

The acceptance set: scikit-learn's digits, 3 images per class, each written
with 4 slightly noisy copies in its own sub-folder (a planted near-duplicate
group). Ungrouped folds put copies of a validation image in training, so
the score is inflated; grouped folds (--group-by-folder 1) do not.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from imgcls.data.folds import fold_of_items
from imgcls.data.sources import open_source
from imgcls.recipe import DataSpec

GROUPS_PER_CLASS, COPIES = 3, 5


def write_near_duplicates(
    out: Path, per_class: int = GROUPS_PER_CLASS, copies: int = COPIES, classes: int = 10
) -> Path:
    """``out/d<digit>/g<index>/<copy>.png``: each digit image and its noisy copies, one folder per group."""
    from datasets import digits_arrays

    images, labels = digits_arrays(8)
    rng = np.random.default_rng(0)
    for c in range(classes):
        for i in np.flatnonzero(labels == c)[:per_class]:
            folder = out / f"d{c}" / f"g{i:04d}"
            folder.mkdir(parents=True)
            for j in range(copies):
                noisy = images[i].astype(np.int16) + rng.integers(-12, 13, images[i].shape)
                Image.fromarray(noisy.clip(0, 255).astype(np.uint8), mode="L").save(folder / f"{j}.png")
    return out


RECIPE = {
    "name": "dup",
    "data": {"source": "folder", "path": "dup", "image_size": 8, "channels": 1},
    "model": {
        "layers": [
            {"conv": {"filters": 16, "kernel": 3, "padding": "same", "activation": "relu"}},
            {"maxpool": 2},
            {"conv": {"filters": 32, "kernel": 3, "padding": "same", "activation": "relu"}},
            "flatten",
        ]
    },
    # threads: 1, as a loaded 2-core machine trains this tiny net ~10x faster on one thread
    "train": {"epochs": 4, "batch_size": 16, "optimizer": {"name": "adam", "lr": 3e-3}, "threads": 1},
}


@pytest.fixture(scope="module")
def dup_set(tmp_path_factory) -> Path:
    """The near-duplicate set and its recipe (runs go to ``runs/`` beside it)."""
    root = tmp_path_factory.mktemp("cv")
    write_near_duplicates(root / "dup")
    (root / "r.yaml").write_text(
        yaml.safe_dump({**RECIPE, "train": {**RECIPE["train"], "out": str(root / "runs")}})
    )
    return root


def _quick(monkeypatch):
    """No curves or report.html per fold: the folds' numbers are the point here (~1.5 s a fold)."""
    import imgcls.report
    import imgcls.training.loop

    monkeypatch.setattr(imgcls.training.loop, "_plot", lambda *a, **k: None)
    monkeypatch.setattr(imgcls.report, "write_report", lambda *a, **k: None)


def _launch_in_process(monkeypatch) -> list[list[str]]:
    """`--nproc`: what each fold's launch would run as `python -m imgcls ARGS` in N processes,
    run here once in this process instead (the same command line through the same parser)."""
    import click
    import typer

    import imgcls.distributed
    from imgcls.cli import app

    calls: list[list[str]] = []

    def launch(args, nproc, **kw):
        calls.append(list(args))
        try:
            typer.main.get_command(app).main(list(args), prog_name="imgcls", standalone_mode=False)
        except click.exceptions.Exit as exc:
            return exc.exit_code
        return 0

    monkeypatch.setattr(imgcls.distributed, "launch", launch)
    return calls


@pytest.fixture(scope="module")
def grouped_and_plain(dup_set, tmp_path_factory):
    """Ungrouped 2-fold cv (through --nproc's launch), and grouped 2-fold cv stopped by
    Ctrl-C after fold 1, then resumed with --final. Everything the tests below read."""
    from conftest import invoke_cli

    import imgcls.cv
    import imgcls.training.loop

    mp = pytest.MonkeyPatch()
    try:
        _quick(mp)
        calls = _launch_in_process(mp)
        plain = invoke_cli("cv", str(dup_set / "r.yaml"), "--folds", "2", "--nproc", "1", "--json")
        # Ctrl-C one step into fold 2: the fold stops with its state saved, as imgcls train stops
        real, real_epoch = imgcls.cv.fold_result, imgcls.training.loop.train_one_epoch

        def one_step_then_stop(run, bar, interrupted, steps_left):
            mp.setattr(imgcls.training.loop, "train_one_epoch", real_epoch)
            return real_epoch(run, bar, interrupted, 1)

        def then_ctrl_c(folder, fold):
            mp.setattr(imgcls.training.loop, "train_one_epoch", one_step_then_stop)
            return real(folder, fold)

        mp.setattr(imgcls.cv, "fold_result", then_ctrl_c)
        parent = dup_set / "grouped"
        stopped = invoke_cli(
            "cv", str(dup_set / "r.yaml"), "--folds", "2", "--group-by-folder", "1", "--out", str(parent)
        )
        after_stop = json.loads((parent / "cv.json").read_text())
        fold1_mtime = (parent / "fold-1" / "best.safetensors").stat().st_mtime_ns
        mp.setattr(imgcls.cv, "fold_result", real)
        resumed = invoke_cli("cv", "--resume", str(parent), "--final", "--json")
    finally:
        mp.undo()
    return {
        "plain": plain,
        "calls": calls,
        "stopped": stopped,
        "after_stop": after_stop,
        "fold1_mtime": fold1_mtime,
        "resumed": resumed,
        "parent": parent,
    }


def test_grouped_cv_reports_a_lower_honest_score_than_ungrouped(grouped_and_plain):
    plain, resumed = grouped_and_plain["plain"], grouped_and_plain["resumed"]
    assert plain.returncode == 0, plain.stderr
    assert resumed.returncode == 0, resumed.stderr
    p, g = json.loads(plain.stdout), json.loads(resumed.stdout)
    p_acc, g_acc = p["summary"]["val_acc"], g["summary"]["val_acc"]
    # leaked copies: ungrouped ~0.95, grouped ~0.6 (measured over 4 seeds: gap 0.29 to 0.39)
    assert p_acc["mean"] > g_acc["mean"] + 0.15, (p_acc, g_acc)
    for doc in (p, g):
        s = doc["summary"]["val_acc"]
        assert len(s["values"]) == 2 and s["min"] <= s["mean"] <= s["max"]
        assert s["std"] == pytest.approx(float(np.std(s["values"], ddof=1)))
        assert [r["fold"] for r in doc["runs"]] == [1, 2] and doc["complete"]
        assert sum(size["val"] for size in doc["sizes"]) == 10 * GROUPS_PER_CLASS * COPIES


def test_nproc_launches_each_fold_as_imgcls_train(grouped_and_plain):
    calls = grouped_and_plain["calls"]
    assert [c[0] for c in calls] == ["train", "train"]
    assert [c[2] for c in calls] == ["--set=data.cv.fold=1", "--set=data.cv.fold=2"]
    cv_dir = Path(json.loads(grouped_and_plain["plain"].stdout)["cv_dir"])
    assert cv_dir.name == "cv-1" and cv_dir.parent.name == "dup"
    assert [c[3] for c in calls] == [f"--out={cv_dir / 'fold-1'}", f"--out={cv_dir / 'fold-2'}"]


def test_a_stopped_cv_resumes_at_its_first_unfinished_fold(grouped_and_plain):
    stopped, parent = grouped_and_plain["stopped"], grouped_and_plain["parent"]
    assert stopped.returncode == 130, stopped.stderr
    assert (
        f"interrupted in fold 2 of 2; finished folds are kept. Continue with: imgcls cv --resume {parent}"
        in (stopped.stderr)
    )
    assert [r["fold"] for r in grouped_and_plain["after_stop"]["runs"]] == [1]
    assert not grouped_and_plain["after_stop"]["complete"]
    # the resume left fold 1 as it was, continued fold 2 from its saved step, then the final run
    assert (parent / "fold-1" / "best.safetensors").stat().st_mtime_ns == grouped_and_plain["fold1_mtime"]
    assert f"resuming {parent / 'fold-2'} at epoch 1, step 1" in grouped_and_plain["resumed"].stderr
    assert "fold 1/2" not in grouped_and_plain["resumed"].stderr
    assert (parent / "fold-2" / "best.safetensors").is_file()


def test_final_trains_every_image_for_the_mean_best_epoch(grouped_and_plain):
    doc = json.loads(grouped_and_plain["resumed"].stdout)
    parent = grouped_and_plain["parent"]
    best = [r["best_epoch"] for r in doc["runs"]]
    assert doc["final_run"] == {"run_dir": "final", "epochs": max(1, round(sum(best) / len(best)))}
    with open(parent / "final" / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == doc["final_run"]["epochs"]
    recipe = yaml.safe_load((parent / "final" / "recipe.yaml").read_text())
    assert recipe["data"]["cv"]["fold"] == "all" and recipe["train"].get("early_stopping") is None
    assert not any(r["val_acc"] for r in rows)  # every image trained: nothing left to validate on


def test_a_fold_folder_is_a_normal_run_that_evaluate_reads(grouped_and_plain):
    """Fold 2's recipe names its fold: evaluate scores the held-out fold, as training did."""
    from imgcls.evaluate import evaluate

    doc = json.loads(grouped_and_plain["resumed"].stdout)
    fold2 = grouped_and_plain["parent"] / "fold-2"
    report = evaluate(fold2, out=fold2.parent.parent / "eval-fold-2", log=lambda message: None).report
    assert report["samples"] == doc["sizes"][1]["val"]
    assert report["accuracy"] == pytest.approx(doc["runs"][1]["metrics"]["val_acc"])


def test_runs_lists_the_folds_under_their_cross_validation(grouped_and_plain, cli):
    parent = grouped_and_plain["parent"]
    result = cli("runs", str(parent.parent), "--json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    names = [r["run"] for r in rows]
    i = names.index("grouped")
    assert names[i + 1 : i + 4] == ["grouped/fold-1", "grouped/fold-2", "grouped/final"]
    assert {r["cv_parent"] for r in rows[i + 1 : i + 4]} == {"grouped"}
    doc = json.loads(grouped_and_plain["resumed"].stdout)
    assert rows[i]["val_acc"] == pytest.approx(doc["summary"]["val_acc"]["mean"])
    assert rows[i]["cv"]["folds"] == 2 and rows[i]["cv"]["finished"] == 2
    table = cli("runs", str(parent.parent))
    assert "grouped (cv: mean of 2/2 folds)" in table.stdout and "└ fold-1" in table.stdout


def test_folds_are_disjoint_stratified_and_groups_stay_whole(dup_set):
    def folds(**grouping):
        out = []
        for i in range(1, 4):
            cv = {"folds": 3, "fold": i, **grouping}
            out.append(open_source(DataSpec(source="folder", path=str(dup_set / "dup"), cv=cv)))
        return out

    plain, grouped = folds(), folds(group_by_folder=1)
    for sources in (plain, grouped):
        vals = [{p for p, _ in s.val} for s in sources]
        assert sum(map(len, vals)) == len(set().union(*vals)) == 150  # disjoint, and every image once
        for s, val in zip(sources, vals, strict=True):
            assert not val & {p for p, _ in s.train}
    # ungrouped: each class dealt evenly (15 images of a class over 3 folds: 5 each)
    assert all(set(Counter(y for _, y in s.val).values()) == {5} for s in plain)
    # grouped: a group's 5 copies are never split between folds
    for s in grouped:
        assert set(Counter(Path(p).parent.name for p, _ in s.val).values()) == {COPIES}
    # the same files, K and seed give the same folds; another seed others
    again = open_source(DataSpec(source="folder", path=str(dup_set / "dup"), cv={"folds": 3, "fold": 1}))
    assert again.val == plain[0].val
    other = DataSpec(source="folder", path=str(dup_set / "dup"), split_seed=1, cv={"folds": 3, "fold": 1})
    assert open_source(other).val != plain[0].val


def test_multilabel_folds_are_iteratively_stratified_and_csv_groups_stay_whole(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    labels = [tuple(int(v) for v in row) for row in rng.random((300, 6)) < [0.5, 0.3, 0.2, 0.1, 0.05, 0.03]]
    fold = fold_of_items(labels, list("abcdef"), None, 5, 0, where="x")
    hot = np.array(labels)
    for j in range(6):  # each label's positives spread within one of n/K per fold
        per_fold = [hot[fold == f, j].sum() for f in range(5)]
        assert max(per_fold) - min(per_fold) <= 1, (j, per_fold)
    # a CSV: a header row naming a grouping column; multi-label rows
    img = tmp_path / "img"
    img.mkdir()
    rows = ["file,labels,patient"]
    for i in range(40):
        Image.new("L", (8, 8), i).save(img / f"{i}.png")
        rows.append(f"img/{i}.png,{'a;b' if i % 3 == 0 else 'a' if i % 3 == 1 else 'b'},p{i // 4}")
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    seen = []
    for i in (1, 2):
        spec = DataSpec(source="csv", path="l.csv", cv={"folds": 2, "fold": i, "group_by": "patient"})
        s = open_source(spec, tmp_path)
        assert s.task == "multilabel" and len(s.train) + len(s.val) == 40
        seen.append({int(Path(p).stem) // 4 for p, _ in s.val})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 10  # each patient in one fold
    # and cv trains them: a multi-label run per fold, val_f1 (what its best epoch is chosen on) summarised
    import imgcls.cv
    from imgcls.recipe import recipe_from_dict

    _quick(monkeypatch)
    raw = {**RECIPE, "data": {"source": "csv", "path": "l.csv", "image_size": 8, "channels": 1}}
    raw["train"] = {**RECIPE["train"], "epochs": 1, "batch_size": 8, "out": str(tmp_path / "runs")}
    plan = imgcls.cv.start(recipe_from_dict(raw), base_dir=tmp_path, folds=2, group_by="patient")
    doc = imgcls.cv.run(plan)
    assert [r["fold"] for r in doc["runs"]] == [1, 2] and len(doc["summary"]["val_f1"]["values"]) == 2
    assert (
        yaml.safe_load((plan.fold_dir(1) / "recipe.yaml").read_text())["data"]["cv"]["group_by"] == "patient"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["--folds", "1"], "--folds 1: cross-validation needs 2 folds or more"),
        (["--folds", "20"], "class 'd0' has 15 training images, fewer than the 20 folds"),
        (["--folds", "2", "--group-by", "patient"], "--group-by patient: names a CSV column"),
        (
            ["--folds", "4", "--group-by-folder", "1", "--set", "data.path=few"],
            "only 3 groups to deal into 4",
        ),
        (
            ["--folds", "2", "--group-by", "site", "--set", "data.source=csv", "--set", "data.path=l.csv"],
            "no column 'site' to group by",
        ),
        ([], "give --folds K"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(dup_set, cli, args, message):
    if not (dup_set / "few").exists():
        write_near_duplicates(dup_set / "few", per_class=1, copies=5, classes=3)  # 3 groups
        files = sorted((dup_set / "dup").rglob("*.png"))
        lines = ["file,label,patient,split"] + [
            f"{f.relative_to(dup_set)},{f.parent.parent.name},x," for f in files
        ]
        (dup_set / "l.csv").write_text("\n".join(lines) + "\n")
    runs = dup_set / "runs" / "dup"
    before = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    result = cli("cv", str(dup_set / "r.yaml"), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    after = sorted(p.name for p in runs.iterdir()) if runs.exists() else []
    assert after == before  # nothing made


def test_a_cross_validation_another_process_writes_is_not_continued(grouped_and_plain, cli):
    """Two `imgcls cv --resume` at once would train the same fold into the same folder
    and interleave cv.json: the second is refused in one line, and works once the
    first has let go (a held folder stands for the other process)."""
    from imgcls import checkpoint as ck

    parent = grouped_and_plain["parent"]
    before = (parent / "cv.json").read_bytes()
    with ck.holding_runs():
        ck.hold_run(parent, "")  # what a running `imgcls cv` holds
        refused = cli("cv", "--resume", str(parent))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {parent}: another imgcls process is writing this run folder (training, resuming, "
        "calibrating or cross-validating it); continue it once that has finished"
    ]
    assert (parent / "cv.json").read_bytes() == before
    again = cli("cv", "--resume", str(parent), "--json")  # finished: the table again
    assert again.returncode == 0, again.stderr
