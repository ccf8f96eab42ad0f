"""The interaction matrix: every pair of these settings, on a tiny model.

The table below is the matrix itself: the tests read it (``PAIRS``), so a
pair cannot be added, dropped or changed here without the tests following,
and a test fails when a pair is missing or an "equals" names a test that does
not exist.

Settings (name: how a run switches it on)
    ddp:            imgcls train --nproc 2 (real processes)
    freeze:         model.freeze: backbone, train.unfreeze_at: 1
    multilabel:     data.source: csv, rows with several labels
    class_weights:  train.class_weights: {circle: 3.0}
    balanced:       data.sampler: balanced
    ema:            train.ema: 0.9
    accumulation:   train.gradient_accumulation: 2
    stream:         batches streamed from the disk cache (memory limit made small in-process; IMGCLS_BATCHES=stream in ranks and trials)
    bf16:           train.precision: bf16
    tta:            imgcls predict --tta
    resume:         stopped after 3 steps, then continued (train --resume)
    tune:           imgcls tune --jobs 2, the settings in the trials' recipe
    export:         imgcls export --format torchscript, then predict --model model.pt
    cv:             data.cv: {folds: 3, fold: 1} (one fold of imgcls cv: trains on the other two)
    distill:        train.distill: {teacher: an untrained checkpoint with the run's classes and task}

References (one setting against its plain counterpart: targeted tests)
    ddp = 1 process:            test_distributed.py::test_two_ranks_follow_one_rank_and_only_rank_0_writes
    stream = in RAM:            test_batches.py::test_streamed_training_gives_the_ram_runs_weights
    resume = uninterrupted:     test_train.py::test_resumed_run_ends_with_the_same_weights
    accumulation = big batch:   test_distributed.py::test_gradient_accumulation_gives_the_larger_batch_weights
    export = checkpoint:        test_export_predict.py::test_predict_on_export_matches_checkpoint
    tta = mean with the mirror: test_tta.py::test_tta_is_the_mean_of_plain_and_flipped_logits

Pairs. Outcomes: "works" (runs to the end, neither setting ignored); "equals
X: FILE::TEST" (also equal to a reference, in that targeted test); "refused:
TEXT" (exit 2 before training, one line naming both settings, TEXT in it);
"n/a: WHY" (the two cannot be asked for together). "defect N" marks a known
defect, item N of issue 17: its case is xfail(strict) until the fix lands.
    ddp × freeze:                equals 1 process: test_distributed.py::test_two_ranks_follow_one_rank_across_unfreeze_at_and_a_resume_past_it
    ddp × multilabel:            works
    ddp × class_weights:         equals 1 process: test_interactions.py::test_ddp_with_class_weights_and_balanced_sampler (fixed here)
    ddp × balanced:              equals 1 process: test_interactions.py::test_ddp_with_class_weights_and_balanced_sampler
    ddp × ema:                   works
    ddp × accumulation:          works
    ddp × stream:                equals 1 process: test_interactions.py::test_ddp_with_class_weights_and_balanced_sampler
    ddp × bf16:                  works
    ddp × tta:                   works
    ddp × resume:                equals 1 process: test_distributed.py::test_resume_across_world_sizes
    ddp × tune:                  n/a: tune has no --nproc (each trial is one process)
    ddp × export:                works
    freeze × multilabel:         works
    freeze × class_weights:      works
    freeze × balanced:           works
    freeze × ema:                works
    freeze × accumulation:       works
    freeze × stream:             works
    freeze × bf16:               works
    freeze × tta:                works
    freeze × resume:             equals uninterrupted: test_finetune.py::test_resume_across_the_unfreeze_switch_is_exact
    freeze × tune:               works
    freeze × export:             works
    multilabel × class_weights:  refused: are for single-label data
    multilabel × balanced:       refused: are for single-label data
    multilabel × ema:            works
    multilabel × accumulation:   works
    multilabel × stream:         works
    multilabel × bf16:           works
    multilabel × tta:            works
    multilabel × resume:         works
    multilabel × tune:           works
    multilabel × export:         equals checkpoint: test_multilabel.py::test_tune_predict_and_export_keep_multilabel_semantics
    class_weights × balanced:    works
    class_weights × ema:         works
    class_weights × accumulation: equals big batch: test_interactions.py::test_class_weights_with_accumulation_equal_the_big_batch (fixed here)
    class_weights × stream:      works
    class_weights × bf16:        works
    class_weights × tta:         works
    class_weights × resume:      works
    class_weights × tune:        works
    class_weights × export:      works
    balanced × ema:              works
    balanced × accumulation:     works
    balanced × stream:           works
    balanced × bf16:             works
    balanced × tta:              works
    balanced × resume:           works
    balanced × tune:             works
    balanced × export:           works
    ema × accumulation:          works
    ema × stream:                works
    ema × bf16:                  works
    ema × tta:                   works
    ema × resume:                equals uninterrupted: test_train.py::test_resumed_run_ends_with_the_same_weights
    ema × tune:                  works
    ema × export:                works
    accumulation × stream:       works
    accumulation × bf16:         works
    accumulation × tta:          works
    accumulation × resume:       works
    accumulation × tune:         works
    accumulation × export:       works
    stream × bf16:               works
    stream × tta:                works
    stream × resume:             works
    stream × tune:               works
    stream × export:             works
    bf16 × tta:                  works
    bf16 × resume:               works
    bf16 × tune:                 works
    bf16 × export:               works
    tta × resume:                works
    tta × tune:                  works
    tta × export:                works
    resume × tune:               n/a: a trial is not resumed; a stopped study is continued by rerunning it (test_tune.py::test_search_prunes_continues_and_best_yaml_retrains_to_its_value)
    resume × export:             works
    tune × export:               works
    cv × ddp:                    equals 1 process: test_interactions.py::test_ddp_with_class_weights_and_balanced_sampler
    cv × freeze:                 works
    cv × multilabel:             works (iterative stratification: test_cv.py::test_multilabel_folds_are_iteratively_stratified_and_csv_groups_stay_whole)
    cv × class_weights:          works
    cv × balanced:               works
    cv × ema:                    works
    cv × accumulation:           works
    cv × stream:                 works
    cv × bf16:                   works
    cv × tta:                    works
    cv × resume:                 works (and imgcls cv --resume: test_cv.py::test_a_stopped_cv_resumes_at_its_first_unfinished_fold)
    cv × tune:                   works (a trial trains one fold; cross-validate the best: imgcls cv runs/STUDY/best.yaml)
    cv × export:                 works
    cv × distill:                works
    distill × ddp:               equals 1 process: test_interactions.py::test_ddp_with_class_weights_and_balanced_sampler
    distill × freeze:            works
    distill × multilabel:        works (KL on each label's softened sigmoid: test_distill.py::test_multilabel_distills_on_sigmoids)
    distill × class_weights:     works
    distill × balanced:          works
    distill × ema:               works
    distill × accumulation:      works (cached = per-step teacher with micro-batches: test_distill.py::test_cached_and_per_step_teacher_logits_train_the_same_student)
    distill × stream:            works
    distill × bf16:              works
    distill × tta:               works
    distill × resume:            equals uninterrupted: test_distill.py::test_a_resumed_distilled_run_equals_the_uninterrupted_one
    distill × tune:              works
    distill × export:            works

Known defects met here (issue 17 items; each case xfail(strict) until its fix lands)
    none (item 3, tune --jobs 2 finishing 2 trials for --trials 1, was fixed: test_interactions.py::test_tune_jobs_finishes_exactly_the_trials_asked)

Features (commands on a finished run, and what every run now does; each
pair below is shown by the targeted test it names)
    calibration:    the temperature train fits on the validation logits (and imgcls calibrate)
    unknown:        imgcls predict / evaluate --min-confidence
    int8:           imgcls export --format onnx --quantize int8 (and its accuracy gate)
    pick:           imgcls pick --model RUN (margin, entropy, least-confidence, diverse)
    serve:          imgcls serve MODEL, POST /v1/predict

Feature pairs. Calibration meets every setting of the table in every run:
check_run asks each run's best.safetensors for a fitted temperature.
    calibration × resume:        equals uninterrupted: test_train.py::test_resumed_run_ends_with_the_same_weights
    calibration × ddp:           equals 1 process: test_distributed.py::test_two_ranks_fit_the_temperature_of_one_process
    calibration × multilabel:    works (a temperature per class): test_multilabel.py::test_a_multilabel_run_gets_a_temperature_per_class
    calibration × export:        works (T in the export's metadata, parity unchanged): test_calibration.py::test_an_export_carries_the_temperature_and_still_passes_its_parity_check
    unknown × multilabel:        works (unknown: no label on and a low score): test_openset.py::test_multilabel_unknown_means_no_label_and_a_low_score
    unknown × tta:               works (judged on the averaged logits): test_openset.py::test_tta_judges_the_averaged_logits
    unknown × export:            equals checkpoint (logit scores; mahalanobis refused: an export gives no features): test_openset.py::test_an_export_rejects_the_same_images_as_its_checkpoint
    int8 × multilabel:           works (the gate on exact match): test_quantize.py::test_multilabel_gate_uses_exact_match_and_predict_keeps_the_label_sets
    int8 × tta:                  works: test_quantize.py::test_int8_export_passes_the_gate_and_predicts_like_fp32
    serve × multilabel:          equals predict: test_serve.py::test_multilabel_checkpoint_answers_its_labels_over_thresholds
    serve × export:              equals predict (checkpoint, ONNX, TorchScript): test_serve.py::test_served_answers_equal_predict_for_a_checkpoint_and_its_exports
    serve × tta:                 equals predict --tta: test_serve.py::test_served_answers_equal_predict_for_a_checkpoint_and_its_exports
    serve × unknown:             equals predict --min-confidence (msp on an export; the stored mahalanobis score on a checkpoint): test_serve.py::test_served_answers_equal_predict_for_a_checkpoint_and_its_exports test_openset.py::test_serve_answers_unknown_as_predict_does_with_the_stored_feature_score
    serve × calibration:         equals predict (one path: predict.calibrated_logits, predict.prediction_records): test_serve.py::test_served_answers_equal_predict_for_a_checkpoint_and_its_exports
    pick × multilabel:           works (the label closest to its threshold; least-confidence refused): test_pick.py::test_pick_on_a_multilabel_model
    pick × export:               equals checkpoint (diverse refused: an export has no embeddings): test_pick.py::test_pick_from_an_export_equals_the_checkpoints
    pick × tta:                  equals mean with the mirror: test_pick.py::test_pick_with_tta_scores_the_mean_of_plain_and_mirrored_logits
    pick × ddp:                  works (diverse, on the 2-rank run): test_interactions.py::test_ddp_with_many_settings_resumed_from_one_process
    pick × resume:               works (the same run was resumed): test_interactions.py::test_ddp_with_many_settings_resumed_from_one_process
    pick × tune:                 works (on a trial's run): test_interactions.py::test_tune_jobs_with_many_settings
    pick × cv:                   works (on a fold's run): test_interactions.py::test_tune_jobs_with_many_settings

How the pairs run: the in-process settings (all but ddp and tune) are combined
by a covering array (allpairspy, pairwise: every value of every two settings
meets in some row) into about ten tiny runs, each checking every setting it
has on; a failing row is shrunk to the smallest subset of its settings that
still fails, named in the message. ddp and tune need real processes: a few
slow runs carry many settings each (``DDP_RUNS``, ``TUNE_RUNS``).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RECIPE, invoke_cli, save_tiny_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore")

TESTS = Path(__file__).resolve().parent

# --------------------------------------------------------------------------- the table, parsed


@dataclass(frozen=True)
class Outcome:
    kind: str  # works | equals | refused | n/a
    text: str  # the rest of the line
    defect: int | None  # issue 17 item of a known defect

    @property
    def runs(self) -> bool:
        return self.kind in ("works", "equals")

    @property
    def references(self) -> list[tuple[str, str]]:
        return re.findall(r"(test_\w+\.py)::(\w+)", self.text)


def _section(doc: str, title: str) -> list[str]:
    lines = doc.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    out = []
    for line in lines[start + 1 :]:  # the indented lines after the title's paragraph
        if line.startswith("    "):
            out.append(line.strip())
        elif out:
            break
    return out


def _settings(doc: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in _section(doc, "Settings"))


def _pairs(doc: str, title: str = "Pairs") -> dict[frozenset, Outcome]:
    pairs: dict[frozenset, Outcome] = {}
    for line in _section(doc, title):
        m = re.fullmatch(r"(\w+) × (\w+):\s+(works|equals|refused|n/a)\b:?\s*(.*)", line)
        assert m, f"cannot read the table line {line!r}"
        a, b, kind, text = m.groups()
        key = frozenset((a, b))
        assert key not in pairs, f"{a} × {b} is in the table twice"
        defect = re.search(r"\bdefect (\d+)", text)
        pairs[key] = Outcome(kind, text, int(defect[1]) if defect else None)
    return pairs


SETTINGS = list(_settings(__doc__))
PAIRS = _pairs(__doc__)
FEATURES = [line.split(":", 1)[0] for line in _section(__doc__, "Features")]
FEATURE_PAIRS = _pairs(__doc__, "Feature pairs")
# the pairs issues 19 and 21 asked for by name
ASKED = [
    *(("calibration", s) for s in ("resume", "ddp")),
    *(("int8", "multilabel"), ("serve", "multilabel"), ("serve", "export")),
    *((f, s) for f in ("cv", "distill", "pick") for s in ("ddp", "multilabel", "resume", "tune")),
]
PROCESS_SETTINGS = {"ddp", "tune"}  # need real processes: the slow runs below
IN_PROCESS = [s for s in SETTINGS if s not in PROCESS_SETTINGS]


def outcome(a: str, b: str) -> Outcome:
    return PAIRS[frozenset((a, b))]


def _compatible(on: set[str]) -> bool:
    """No refused, impossible or known-defect pair among ``on``."""
    return all(
        outcome(a, b).runs and outcome(a, b).defect is None for a, b in itertools.combinations(sorted(on), 2)
    )


@functools.cache
def covering_rows() -> list[frozenset]:
    """Pairwise covering array over the in-process settings (each on or off)."""
    from allpairspy import AllPairs

    def allowed(row: list[bool]) -> bool:
        return _compatible({s for s, v in zip(IN_PROCESS, row, strict=False) if v})

    rows = AllPairs([[True, False]] * len(IN_PROCESS), filter_func=allowed)
    on = [frozenset(s for s, v in zip(IN_PROCESS, row, strict=True) if v) for row in rows]
    on = [row for row in on if row]
    # a filtered AllPairs can leave a pair out: rows for those, greedily as full as allowed
    wanted = [p for p, r in PAIRS.items() if r.runs and r.defect is None and p <= set(IN_PROCESS)]
    uncovered = [p for p in wanted if not any(p <= row for row in on)]
    while uncovered:
        row = set(uncovered[0])
        for setting in IN_PROCESS:
            if setting not in row and _compatible(row | {setting}):
                row.add(setting)
        on.append(frozenset(row))
        uncovered = [p for p in uncovered if not p <= row]
    return on


# the settings combined in each real-process run (tune: in the trials' recipe)
DDP_RUNS = [
    frozenset({"ddp", "multilabel", "freeze", "ema", "accumulation", "bf16", "resume", "tta", "export"}),
    frozenset({"ddp", "class_weights", "balanced", "stream", "cv", "distill"}),
]
TUNE_RUNS = [
    frozenset({"tune", "multilabel", "freeze", "ema", "accumulation", "bf16", "tta", "export"}),
    frozenset({"tune", "class_weights", "balanced", "stream", "cv", "distill"}),
]


# --------------------------------------------------------------------------- the table is whole


def test_the_table_names_every_pair_once_and_its_references_exist():
    assert len(SETTINGS) == len(set(SETTINGS)) == 15
    assert set(PAIRS) == {frozenset(p) for p in itertools.combinations(SETTINGS, 2)}
    for pair, result in PAIRS.items():
        if result.kind == "equals":
            assert result.references, f"{' × '.join(sorted(pair))}: 'equals' names no test"
        for file, name in result.references:
            source = (TESTS / file).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"
    for line in _section(__doc__, "References") + _section(__doc__, "Known defects"):
        for file, name in re.findall(r"(test_\w+\.py)::(\w+)", line):
            assert re.search(rf"^def {name}\(", (TESTS / file).read_text(), re.M), f"{file}::{name}"


def test_each_feature_pair_names_the_test_that_shows_it():
    for pair, result in FEATURE_PAIRS.items():
        shown = " × ".join(sorted(pair))
        assert pair & set(FEATURES) and pair <= set(FEATURES) | set(SETTINGS), f"{shown}: not a feature pair"
        assert not result.runs or result.references, f"{shown}: names no test"
        for file, name in result.references:
            source = (TESTS / file).read_text()
            assert re.search(rf"^def {name}\(", source, re.M), f"{file}::{name} does not exist"
    for a, b in ASKED:
        assert frozenset((a, b)) in PAIRS or frozenset((a, b)) in FEATURE_PAIRS, f"{a} × {b} is missing"


def test_every_pair_that_runs_is_covered_by_some_run():
    runs = covering_rows() + DDP_RUNS + TUNE_RUNS
    for pair, result in PAIRS.items():
        if result.runs:
            assert any(pair <= run for run in runs), f"{' × '.join(sorted(pair))} is in no run"
    for run in DDP_RUNS + TUNE_RUNS:  # a process run holds no pair that cannot run together
        for a, b in itertools.combinations(sorted(run), 2):
            assert outcome(a, b).runs, f"{a} × {b} in a process run, but the table says {outcome(a, b).kind}"
    assert len(covering_rows()) <= 12


# --------------------------------------------------------------------------- data, recipes


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The multi-label CSV (24 images, 4 classes) and images for predict."""
    from test_multilabel import KINDS, write_multilabel

    root = tmp_path_factory.mktemp("multilabel")
    labels = write_multilabel(root, 24)
    teachers = tmp_path_factory.mktemp("teachers")
    return {
        "multilabel_csv": labels,
        "multilabel_images": sorted((root / "img").glob("*.png"))[:3],
        "teacher": save_tiny_checkpoint(teachers / "single.safetensors"),
        "teacher_ml": save_tiny_checkpoint(teachers / "ml.safetensors", sorted(KINDS), task="multilabel"),
    }


def recipe_dict(on: set[str], data: dict, out: Path) -> dict:
    raw = copy.deepcopy(TINY_RECIPE)
    raw["train"] = {"epochs": 2, "batch_size": 4, "deterministic": True, "out": str(out)}
    if "multilabel" in on:
        raw["name"] = "ml"
        raw["data"] = {"source": "csv", "path": str(data["multilabel_csv"]), "image_size": 16}
    if "freeze" in on:
        raw["model"]["freeze"] = "backbone"
        raw["train"]["unfreeze_at"] = 1
    if "class_weights" in on:
        raw["train"]["class_weights"] = {"circle": 3.0}
    if "balanced" in on:
        raw["data"]["sampler"] = "balanced"
    if "ema" in on:
        raw["train"]["ema"] = 0.9
    if "accumulation" in on:
        raw["train"]["gradient_accumulation"] = 2
    if "stream" in on:
        raw["data"]["cache"] = "disk"
    if "bf16" in on:
        raw["train"]["precision"] = "bf16"
    if "cv" in on:
        raw["data"]["cv"] = {"folds": 3, "fold": 1}
    if "distill" in on:
        raw["train"]["distill"] = {"teacher": str(data["teacher_ml" if "multilabel" in on else "teacher"])}
    return raw


@contextlib.contextmanager
def streamed(on: set[str]):
    """The memory this process may use made tiny, so the training split is streamed
    (chunks of 8 rows, a pool of one chunk), as in test_batches."""
    if "stream" not in on:
        yield
        return
    from imgcls.data import batches

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(batches, "CHUNK_ROWS", 8)
        mp.setattr(batches, "process_memory_limit", lambda: 4000)
        yield


@contextlib.contextmanager
def spies():
    """What the loss and the sampler were given: class weights, balanced epochs."""
    import torch.nn.functional as F

    from imgcls import imbalance

    seen = {"weighted_loss": 0, "balanced_epochs": 0}
    cross_entropy, balanced_order = F.cross_entropy, imbalance.balanced_order

    def ce(*args, **kwargs):
        if kwargs.get("weight") is not None:
            seen["weighted_loss"] += 1
        return cross_entropy(*args, **kwargs)

    def order(*args, **kwargs):
        seen["balanced_epochs"] += 1
        return balanced_order(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F, "cross_entropy", ce)
        mp.setattr(imbalance, "balanced_order", order)
        yield seen


# --------------------------------------------------------------------------- checks


RUN_FILES = {
    "best.safetensors",
    "last.safetensors",
    "resume.pt",
    "metrics.csv",
    "curves.png",
    "recipe.yaml",
    "report.html",
    "run.json",
    "summary.json",
    "summary.txt",
}


def check_run(on: set[str], run: Path, log: str, seen: dict | None) -> list[str]:
    """What the run folder, its state and its log show of each setting: the
    problems found (an empty list: every setting took effect)."""
    from safetensors.torch import load_file

    from imgcls.checkpoint import read_meta

    problems = []
    missing = RUN_FILES - {p.name for p in run.iterdir()}
    if missing:
        return [f"run folder lacks {sorted(missing)}"]
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    if [r["epoch"] for r in rows] != ["1", "2"]:
        problems.append(f"metrics.csv epochs {[r['epoch'] for r in rows]}, not 1, 2")
    info = json.loads((run / "run.json").read_text())
    saved = torch.load(run / "resume.pt", weights_only=True)
    last = load_file(str(run / "last.safetensors"))
    meta = read_meta(run / "best.safetensors")

    def expect(setting: str, ok: bool, what: str) -> None:
        if ok != (setting in on):
            problems.append(f"{setting} {'on' if setting in on else 'off'} but {what}")

    expect("ddp", info.get("world_size") == 2, f"run.json world_size {info.get('world_size')}")
    expect("stream", info["batches"] == "stream", f"run.json batches {info['batches']!r}")
    expect("bf16", info["precision"] == "bf16", f"run.json precision {info['precision']!r}")
    expect("accumulation", info.get("gradient_accumulation") == 2, "run.json gradient_accumulation missing")
    expect("multilabel", meta.get("task") == "multilabel", f"checkpoint task {meta.get('task')!r}")
    fitted = (meta.get("calibration") or {}).get("temperature")
    if not isinstance(fitted, (int, float, list)) or fitted == 1:
        problems.append(f"best.safetensors holds no fitted temperature: {meta.get('calibration')!r}")
    expect("multilabel", "val_f1" in rows[0], "metrics.csv has no val_f1" if "multilabel" in on else "val_f1")
    ema = saved["ema"]
    moved = bool(ema) and any(not torch.equal(ema[k], last[k]) for k in last if k in ema)
    expect("ema", moved, "resume.pt holds no EMA weights apart from the model's")
    if log:  # the log of a process run is rank 0's stderr; tune trials log nothing
        expect("freeze", "frozen (backbone)" in log and "until epoch 1" in log, "the log says nothing frozen")
        expect("resume", "resuming " in log, "the log shows no resume")
        expect("distill", "distill: teacher " in log, "the log names no teacher")
        expect("cv", "data.cv: fold 1 of 3 validates" in log, "the log names no fold")
    if seen is not None:  # spied in this process
        expect("class_weights", seen["weighted_loss"] > 0, "the loss never got class weights")
        expect("balanced", seen["balanced_epochs"] >= 2, "the balanced sampler drew no epoch")
    # optimizer steps per parameter (Adam's count): every step of 2 epochs for
    # the head, the second epoch's only for a frozen-then-unfrozen backbone
    train_n = int(re.search(r"(\d+) train", log)[1]) if log and re.search(r"(\d+) train", log) else None
    steps = sorted({int(s["step"]) for s in saved["optimizer"]["state"].values()})
    per_epoch = None if train_n is None else train_n // (4 * (2 if "accumulation" in on else 1))
    if per_epoch is not None and steps[-1] != 2 * per_epoch:
        problems.append(f"the head took {steps[-1]} optimizer steps, not 2 epochs x {per_epoch}")
    if "freeze" in on and steps[0] * 2 != steps[-1]:
        problems.append(f"freeze: optimizer steps per parameter {steps}: the backbone was never frozen")
    if "freeze" not in on and len(steps) != 1:
        problems.append(f"optimizer steps per parameter differ: {steps}")
    return problems


def _probabilities(stdout: str) -> list[dict[str, float]]:
    out = []
    for line in stdout.splitlines():
        r = json.loads(line)
        labels = r["labels"] if "labels" in r else r["top_k"]
        out.append({x["label"]: x["p"] for x in labels})
    return out


def check_outputs(on: set[str], run: Path, images: list[Path]) -> list[str]:
    """tta and export -> predict on the finished run."""
    problems = []
    files = [str(p) for p in images]
    every = ["--threshold", "0"] if "multilabel" in on else ["--top-k", "4"]  # every class's probability

    def predict(model: Path, *extra: str) -> list[dict[str, float]] | None:
        r = invoke_cli("predict", *files, "--model", str(model), "--json", *every, *extra)
        if r.returncode != 0:
            problems.append(f"predict --model {model.name} {' '.join(extra)}: exit {r.returncode}: {r.stderr[-300:]}")
            return None
        return _probabilities(r.stdout)

    plain = predict(run)
    if "tta" in on:
        tta = predict(run, "--tta")
        if plain and tta and tta == plain:
            problems.append("predict --tta gave the plain probabilities: TTA ignored")
    if "export" in on:
        r = invoke_cli("export", str(run), "--format", "torchscript", "-q")
        if r.returncode != 0:
            return problems + [f"export: exit {r.returncode}: {r.stderr[-300:]}"]
        pairs = [(plain, predict(run / "model.pt"))]
        if "tta" in on:
            pairs.append((predict(run, "--tta"), predict(run / "model.pt", "--tta")))
        for want, got in pairs:
            if want is None or got is None:
                continue
            if [set(w) for w in want] != [set(g) for g in got] or any(
                abs(w[k] - g[k]) > 1e-4 for w, g in zip(want, got, strict=True) for k in w
            ):
                problems.append(f"predict on model.pt {got} differs from the checkpoint's {want}")
    return problems


# --------------------------------------------------------------------------- the in-process rows


def train_row(on: set[str], data: dict, folder: Path) -> tuple[Path | None, str, dict, list[str]]:
    """Train with ``on``; (run folder, log, spied, problems)."""
    from imgcls.errors import ImgclsError, Interrupted
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    recipe = recipe_from_dict(recipe_dict(on, data, folder / "runs"))
    run, lines = folder / "run", []
    with streamed(on), spies() as seen:
        try:
            if "resume" in on:
                try:
                    train(recipe, out=run, log=lines.append, stop_after_steps=3)
                    return None, "", seen, ["stop_after_steps=3 did not stop the run"]
                except Interrupted:
                    pass
                train(recipe, resume=run, log=lines.append)
            else:
                train(recipe, out=run, log=lines.append)
        except ImgclsError as exc:
            return None, "", seen, [f"train failed (exit {exc.exit_code}): {exc}"]
        except Exception as exc:  # a crash mid-run: the point of the matrix
            return None, "", seen, [f"train crashed: {type(exc).__name__}: {exc}"]
    return run, "\n".join(lines), seen, []


def run_row(on: set[str], data: dict, folder: Path) -> list[str]:
    folder.mkdir(parents=True)
    run, log, seen, problems = train_row(on, data, folder)
    if problems:
        return problems
    problems = check_run(on, run, log, seen)
    images = data["multilabel_images"] if "multilabel" in on else data["single_images"]
    return problems + check_outputs(on, run, images)


def shrink(on: set[str], data: dict, folder: Path) -> tuple[set[str], list[str]] | None:
    """The smallest subset of ``on`` (one setting, else a pair) that fails alone."""
    for size in (1, 2):
        for i, subset in enumerate(itertools.combinations(sorted(on), size)):
            problems = run_row(set(subset), data, folder / f"shrink{size}-{i}")
            if problems:
                return set(subset), problems
    return None


def _row_id(row: frozenset) -> str:
    return "+".join(s for s in IN_PROCESS if s in row)


@pytest.fixture(scope="module")
def images(data, shapes_folder):
    return {**data, "single_images": sorted(shapes_folder.rglob("*.png"))[::8]}


@pytest.mark.parametrize("row", covering_rows(), ids=_row_id)
def test_combined_run(row, images, tmp_path):
    problems = run_row(set(row), images, tmp_path / "row")
    if problems:
        culprit = shrink(set(row), images, tmp_path)
        where = (
            f"smallest failing subset: {' × '.join(sorted(culprit[0]))}: {'; '.join(culprit[1])}"
            if culprit
            else "no single setting or pair fails alone: the row's combination of three or more does"
        )
        pytest.fail(f"{_row_id(row)}: {'; '.join(problems)}\n{where}")


# --------------------------------------------------------------------------- refused pairs


REFUSED = sorted(tuple(sorted(p)) for p, r in PAIRS.items() if r.kind == "refused")
SETTING_NAMES = {  # how a refusal names each setting
    "multilabel": "multi-label",
    "class_weights": "train.class_weights",
    "balanced": "data.sampler: balanced",
}


@pytest.mark.parametrize("pair", REFUSED, ids="+".join)
def test_refused_pair(pair, images, tmp_path, cli):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(recipe_dict(set(pair), images, tmp_path / "runs")))
    result = cli("train", str(recipe), "--out", str(tmp_path / "run"), "-q")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert outcome(*pair).text in lines[0]
    for setting in pair:
        assert SETTING_NAMES[setting] in lines[0], (setting, lines[0])
    assert not (tmp_path / "run").exists() and not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------- targeted equalities


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "last.safetensors"))


def _train_quiet(raw: dict, **kwargs):
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    return train(recipe_from_dict(raw), log=lambda m: None, **kwargs)


def test_class_weights_with_accumulation_equal_the_big_batch(images, tmp_path):
    """Weighted cross-entropy is a sum over the batch: two micro-batches of 4
    give the step one batch of 8 gives (a per-batch weighted mean would not)."""
    raw = recipe_dict({"class_weights"}, images, tmp_path)
    raw["train"].update(epochs=1, batch_size=8)
    big = _train_quiet(raw, out=tmp_path / "big")
    raw["train"].update(batch_size=4, gradient_accumulation=2)
    accumulated = _train_quiet(raw, out=tmp_path / "acc")
    a, b = _weights(big.run_dir), _weights(accumulated.run_dir)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- real processes


def _write_recipe(on: set[str], data: dict, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(on, data, folder / "runs")))
    return path


@pytest.mark.slow
def test_ddp_with_many_settings_resumed_from_one_process(images, tmp_path):
    """DDP_RUNS[0]: stopped in one process, finished by 2 (the launcher in-process)."""
    on = set(DDP_RUNS[0])
    from imgcls.errors import Interrupted
    from imgcls.recipe import load_recipe
    from imgcls.training import train

    recipe = _write_recipe(on, images, tmp_path)
    run = tmp_path / "run"
    with pytest.raises(Interrupted):
        train(load_recipe(recipe), out=run, log=lambda m: None, stop_after_steps=1)
    result = invoke_cli("train", str(recipe), "--resume", str(run), "--nproc", "2")
    assert result.returncode == 0, result.stderr
    problems = check_run(on, run, result.stderr, None) + check_outputs(on, run, images["multilabel_images"])
    assert not problems, problems
    files = [str(p) for p in images["multilabel_images"]]
    picked = invoke_cli("pick", "--model", str(run), *files, "--n", "2", "--strategy", "diverse", "--json")
    assert picked.returncode == 0, picked.stderr
    assert len(json.loads(picked.stdout)["picks"]) == 2, picked.stdout


@pytest.mark.slow
def test_ddp_with_class_weights_and_balanced_sampler(images, tmp_path, monkeypatch):
    """DDP_RUNS[1]: 2 ranks equal 1 process with class weights and the balanced sampler,
    both streaming their batches from the disk cache."""
    on = set(DDP_RUNS[1])
    monkeypatch.setenv("IMGCLS_BATCHES", "stream")  # the ranks inherit it
    recipe = _write_recipe(on, images, tmp_path)
    result = invoke_cli("train", str(recipe), "--nproc", "2", "--out", str(tmp_path / "two"))
    assert result.returncode == 0, result.stderr
    problems = check_run(on, tmp_path / "two", result.stderr, None)
    assert not problems, problems
    with spies() as seen:
        one = _train_quiet(yaml.safe_load(recipe.read_text()), out=tmp_path / "one")
    assert not check_run(on - {"ddp"}, one.run_dir, "", seen)
    a, b = _weights(one.run_dir), _weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


# (trials asked, extra options): the first asks fewer trials than jobs (2 start
# at once; issue 17 item 3 finished both), the second more (the workers take turns)
TUNE_LAUNCHES = [(1, []), (3, ["--pruner", "none"])]


@pytest.fixture(scope="module")
def tuned(images, tmp_path_factory):
    """TUNE_RUNS, each `imgcls tune --jobs 2` with TUNE_LAUNCHES' trials: the
    second is also test_jobs_2_runs_each_trial_as_a_standalone_train's study
    (one thread, so a trial and its retraining add up in the same order)."""
    out = []
    for i, (on, (trials, extra)) in enumerate(zip(TUNE_RUNS, TUNE_LAUNCHES, strict=True)):
        folder = tmp_path_factory.mktemp(f"tune{i}")
        raw = recipe_dict(set(on), images, folder / "runs")
        if trials > 1:
            raw["train"]["threads"] = 1
        folder.joinpath("recipe.yaml").write_text(yaml.safe_dump(raw))
        recipe = folder / "recipe.yaml"
        (folder / "recipe.space.yaml").write_text("train.optimizer.lr: {loguniform: [1e-3, 1e-2]}\n")
        with pytest.MonkeyPatch.context() as mp:
            if "stream" in on:
                mp.setenv("IMGCLS_BATCHES", "stream")  # the trial processes inherit it
            result = invoke_cli(
                "tune", str(recipe), "--trials", str(trials), "--jobs", "2", *extra, "--json", cwd=folder
            )
        out.append((set(on), folder, result))
    return out


@pytest.mark.slow
def test_tune_jobs_with_many_settings(tuned, images):
    for on, folder, result in tuned:
        assert result.returncode == 0, result.stderr
        trials = json.loads(result.stdout)["trials"]
        assert trials, result.stdout
        for trial in trials:
            run = folder / trial["run_dir"]
            problems = check_run(on - {"tune"}, run, "", None)
            assert not problems, (sorted(on), trial["number"], problems)
        images_for = images["multilabel_images"] if "multilabel" in on else images["single_images"]
        problems = check_outputs(on, folder / trials[0]["run_dir"], images_for)
        assert not problems, (sorted(on), problems)
        files = [str(p) for p in images_for]
        picked = invoke_cli("pick", "--model", str(folder / trials[0]["run_dir"]), *files, "--n", "2", "--json")
        assert picked.returncode == 0, picked.stderr
        assert len(json.loads(picked.stdout)["picks"]) == 2, picked.stdout


@pytest.mark.slow
def test_tune_jobs_finishes_exactly_the_trials_asked(tuned):
    for (_, _, result), (asked, _) in zip(tuned, TUNE_LAUNCHES, strict=True):
        assert sorted(t["number"] for t in json.loads(result.stdout)["trials"]) == list(range(asked))


@pytest.mark.slow
def test_jobs_2_runs_each_trial_as_a_standalone_train(tuned, tmp_path):
    """Trials in worker processes share no state: each equals its recipe.yaml
    trained alone (moved from test_tune.py: one tune --jobs 2 launch serves both)."""
    from imgcls.recipe import load_recipe
    from imgcls.training import train
    from imgcls.training.outputs import TIMINGS

    def weight_rows(rows) -> list[dict]:  # metrics rows without the timings (differ between any two runs)
        return [{k: float(v) for k, v in r.items() if k not in TIMINGS} for r in rows]

    _, folder, result = tuned[1]
    trials = json.loads(result.stdout)["trials"]
    assert sorted(t["number"] for t in trials) == [0, 1, 2], result.stderr
    assert all(t["state"] == "complete" for t in trials)
    for t in trials:
        run = folder / t["run_dir"]
        alone = train(load_recipe(run / "recipe.yaml"), out=tmp_path / f"alone{t['number']}", log=lambda m: None)
        with open(run / "metrics.csv") as f:
            assert weight_rows(csv.DictReader(f)) == weight_rows(alone.history), t["number"]
        assert t["value"] == alone.best["val_acc"]
    # the workers' lines reach the log
    assert [m for m in result.stderr.splitlines() if m.startswith("trial 2: val_acc")], result.stderr
