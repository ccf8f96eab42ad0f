"""`imgcls pick`: which unlabelled images to label next.

Whether margin or diverse picking beats random picking at the same labelling
budget is measured by bench/pick_gain.py (train, pick, retrain over rounds:
minutes, not a test); here: the scores, the spread, the files written and
copied, the refusals, and pick with an export, a multi-label model and --tta.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE, save_tiny_checkpoint

SCORE_ATOL = 1e-4  # an export's probabilities agree with the checkpoint's to export.Tolerance.prob_atol


def one_line_error(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, shapes_folder) -> Path:
    """The 24 shapes, plus a file of the same name in two folders, plus a hostile name."""
    root = tmp_path_factory.mktemp("unlabelled") / "data"
    shutil.copytree(shapes_folder, root)
    shutil.copyfile(shapes_folder / "circle" / "circle_0000.png", root / "circle" / "same.png")
    shutil.copyfile(shapes_folder / "square" / "square_0000.png", root / "square" / "same.png")
    shutil.copyfile(shapes_folder / "triangle" / "triangle_0000.png", root / "triangle" / "evil\n[bold]x.png")
    return root


def tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``root``: its bytes and modification time."""
    return {str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


# --------------------------------------------------------------------------- the scores


def test_strategies_rank_by_their_own_score_on_known_probabilities():
    from imgcls.pick import uncertainty

    probs = torch.tensor(
        [
            [0.50, 0.50, 0.00],  # a tie at the top: the smallest margin
            [0.40, 0.30, 0.30],  # the lowest top probability, the most spread out
            [0.90, 0.10, 0.00],  # sure
            [0.60, 0.20, 0.20],
        ]
    )
    margin, label = uncertainty(probs, "margin")
    assert margin.tolist() == pytest.approx([1.0, 0.9, 0.2, 0.6])
    assert label.tolist() == [0, 0, 0, 0]
    least, _ = uncertainty(probs, "least-confidence")
    assert least.tolist() == pytest.approx([0.5, 0.6, 0.1, 0.4])
    entropy, _ = uncertainty(probs, "entropy")
    want = [-sum(p * math.log(p) for p in row if p > 0) / math.log(3) for row in probs.tolist()]
    assert entropy.tolist() == pytest.approx(want)
    assert margin.argsort(descending=True).tolist() == [0, 1, 3, 2]
    assert least.argsort(descending=True).tolist() == [1, 0, 3, 2]
    assert entropy.argsort(descending=True).tolist() == [1, 3, 0, 2]


def test_multilabel_margin_is_the_label_closest_to_its_threshold():
    from imgcls.pick import uncertainty

    probs = torch.tensor([[0.90, 0.75], [0.55, 0.10], [0.99, 0.01]])
    score, label = uncertainty(probs, "margin", "multilabel", [0.5, 0.8])
    # row 0: label 1 is 0.05 below its 0.8 (of 0.8 below it); row 1: label 0 is 0.05 above its 0.5
    # (of 0.5 above it); row 2: both sure, label 0 the less so (0.49 of 0.5 above)
    assert score.tolist() == pytest.approx([1 - 0.05 / 0.8, 1 - 0.05 / 0.5, 1 - 0.49 / 0.5])
    assert label.tolist() == [1, 0, 0]


def test_k_center_greedy_spreads_over_clusters_before_taking_a_second_of_one():
    from imgcls.pick import k_center_greedy

    # rows in order of uncertainty: three near-copies of A, two of B, one C
    a, b, c = torch.tensor([0.0, 0.0]), torch.tensor([10.0, 0.0]), torch.tensor([0.0, 20.0])
    x = torch.stack([a, a + 0.01, a + 0.02, b, b + 0.01, c])
    cluster = [0, 0, 0, 1, 1, 2]
    picked = k_center_greedy(x, 3)
    assert picked[0] == 0  # the most uncertain first
    assert sorted(cluster[i] for i in picked) == [0, 1, 2]
    assert k_center_greedy(torch.zeros(4, 3), 3) == [0, 1, 2]  # all equal: uncertainty decides


# --------------------------------------------------------------------------- the command


def test_diverse_does_not_pick_planted_copies_together(tmp_path, shapes_folder, tiny_checkpoint):
    from imgcls.pick import pick

    folder = tmp_path / "pool"
    shutil.copytree(shapes_folder, folder)
    top = pick([str(folder)], n=1, model=tiny_checkpoint, log=lambda m: None).picks[0].file
    for i in range(5):  # five copies of the most uncertain image: all five as uncertain as it
        shutil.copyfile(top, folder / "circle" / f"copy{i}.png")
    margin = pick([str(folder)], n=5, model=tiny_checkpoint, log=lambda m: None).picks
    diverse = pick([str(folder)], n=5, strategy="diverse", model=tiny_checkpoint, log=lambda m: None).picks
    copies = {top, *(str(folder / "circle" / f"copy{i}.png") for i in range(5))}
    assert sum(p.file in copies for p in margin) == 5  # margin alone: the near-copies fill the list
    assert sum(p.file in copies for p in diverse) == 1, [p.file for p in diverse]
    assert diverse[0].file == margin[0].file  # from the most uncertain


def test_pick_writes_the_list_and_copies_without_touching_the_originals(cli, data, tiny_checkpoint, tmp_path):
    before = tree(data)
    out, dest = tmp_path / "picks.csv", tmp_path / "to-label"
    r = cli("pick", "--model", str(tiny_checkpoint), str(data), "--n", "27", "--out", str(out),
            "--copy-to", str(dest))  # fmt: skip
    assert r.returncode == 0, r.stderr
    # people's table: the hostile name is shown escaped, as data
    assert 'evil\\n[bold]x.png"' in r.stdout and "evil\n" not in r.stdout
    r = cli("pick", "--model", str(tiny_checkpoint), str(data), "--n", "27", "--out", str(tmp_path / "p.json"),
            "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    picks = result["picks"]
    assert json.loads((tmp_path / "p.json").read_text())["picks"] == picks
    assert [p["rank"] for p in picks] == list(range(1, 28)) and result["scored"] == 27
    assert [p["score"] for p in picks] == sorted((p["score"] for p in picks), reverse=True)
    with out.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == [p["file"] for p in picks]
    assert rows[0].keys() == {"rank", "file", "score", "label", "probability"}
    assert tree(data) == before  # nothing moved, nothing changed, nothing added
    copies = sorted(p.name for p in dest.iterdir())
    assert len(copies) == 28 and "picks.csv" in copies  # both same.png kept: ranks tell them apart
    with (dest / "picks.csv").open(newline="", encoding="utf-8") as f:
        manifest = list(csv.DictReader(f))
    assert [row["file"] for row in manifest] == [p["file"] for p in picks]
    for row in manifest:
        assert (dest / row["copy"]).read_bytes() == Path(row["file"]).read_bytes()
    assert sum(row["copy"].endswith("-same.png") for row in manifest) == 2

    # again into the same folder: an earlier pick is ours to replace; once the user adds to it, it is not
    r = cli("pick", "--model", str(tiny_checkpoint), str(data), "--n", "3", "--copy-to", str(dest))
    assert r.returncode == 0, r.stderr
    assert len(list(dest.iterdir())) == 4 and "replacing the copies of an earlier pick" in r.stderr
    (dest / "circle").mkdir()
    r = cli("pick", "--model", str(tiny_checkpoint), str(data), "--n", "3", "--copy-to", str(dest))
    assert r.returncode == 2 and "is not empty" in one_line_error(r)
    assert len(list(dest.iterdir())) == 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--n", "0"], "--n: 0: pick at least 1 image"),
        (["--strategy", "most-fun"], "is not one of margin, entropy"),
        (["--out", "picks.txt"], "write a .csv or a .json file"),
        (["--copy-to", "{data}/square/labels"], "is inside the data"),
        (["--copy-to", "{data}"], "is inside the data"),
        (["--copy-to", "dest", "--out", "dest/p.csv"], "is inside --copy-to"),
    ],
)
def test_pick_refuses_bad_input_in_one_line(cli, data, tiny_checkpoint, args, message, tmp_path):
    before = tree(data)
    args = [a.format(data=data) for a in args]
    r = cli("pick", "--model", str(tiny_checkpoint), str(data), *args, cwd=tmp_path)
    assert r.returncode == 2 and message in one_line_error(r)
    assert tree(data) == before and list(tmp_path.iterdir()) == []


def test_pick_of_a_missing_folder_or_unreadable_files(cli, tiny_checkpoint, tmp_path, shapes_folder):
    r = cli("pick", "--model", str(tiny_checkpoint), str(tmp_path / "nowhere"), "--n", "5")
    assert r.returncode == 2 and "no such file or folder" in one_line_error(r)
    folder = tmp_path / "some-bad"
    shutil.copytree(shapes_folder / "circle", folder)
    (folder / "broken.png").write_bytes(b"not a png")
    r = cli("pick", "--model", str(tiny_checkpoint), str(folder), "--n", "20", "--json")
    assert r.returncode == 3, r.stderr  # as predict: the others are still ranked
    result = json.loads(r.stdout)
    assert len(result["picks"]) == 8 and [f["file"] for f in result["failed"]] == [str(folder / "broken.png")]


# --------------------------------------------------------------------------- with other settings


@pytest.fixture(scope="module")
def torchscript(tmp_path_factory, tiny_checkpoint) -> Path:
    from conftest import invoke_cli

    path = tmp_path_factory.mktemp("export") / "model.pt"
    r = invoke_cli("export", str(tiny_checkpoint), "--format", "torchscript", "--out", str(path), "-q")
    assert r.returncode == 0, r.stderr
    return path


def test_pick_from_an_export_equals_the_checkpoints(cli, data, tiny_checkpoint, torchscript):
    got = {}
    for model in (tiny_checkpoint, torchscript):
        r = cli("pick", "--model", str(model), str(data), "--n", "10", "--json")
        assert r.returncode == 0, r.stderr
        got[model] = json.loads(r.stdout)["picks"]
    want, have = got[tiny_checkpoint], got[torchscript]
    assert [p["file"] for p in have] == [p["file"] for p in want]
    assert [p["score"] for p in have] == pytest.approx([p["score"] for p in want], abs=SCORE_ATOL)


def test_diverse_on_an_export_is_refused(cli, data, torchscript):
    r = cli("pick", "--model", str(torchscript), str(data), "--strategy", "diverse")
    assert r.returncode == 2 and "needs the model's embeddings" in one_line_error(r)


def test_pick_with_tta_scores_the_mean_of_plain_and_mirrored_logits(cli, shapes_folder, tiny_checkpoint):
    from imgcls.data.inputs import load_input
    from imgcls.pick import uncertainty
    from imgcls.predictor import load_predictor

    r = cli("pick", "--model", str(tiny_checkpoint), str(shapes_folder), "--n", "4", "--tta", "--json")
    assert r.returncode == 0, r.stderr
    picks = json.loads(r.stdout)["picks"]
    predictor = load_predictor(tiny_checkpoint, log=lambda m: None)
    x = torch.stack([load_input(p["file"], predictor.preprocessing) for p in picks])
    with torch.inference_mode():
        plain = predictor.batch_logits(x)
        mirrored = predictor.batch_logits(x.flip(-1))
    want, _ = uncertainty(torch.softmax((plain + mirrored) / 2, dim=1), "margin")
    assert [p["score"] for p in picks] == pytest.approx(want.tolist(), abs=1e-6)
    plain_score, _ = uncertainty(torch.softmax(plain, dim=1), "margin")
    assert [p["score"] for p in picks] != pytest.approx(plain_score.tolist(), abs=1e-6)


def test_pick_on_a_multilabel_model(cli, shapes_folder, tmp_path):
    from imgcls.checkpoint import save_checkpoint
    from imgcls.predictor import load_predictor

    path = save_tiny_checkpoint(tmp_path / "plain.safetensors")
    ckpt = load_predictor(path, log=lambda m: None)
    from imgcls.checkpoint import read_meta

    meta = {**read_meta(path), "task": "multilabel", "thresholds": [0.3, 0.5, 0.7]}
    meta = {k: v for k, v in meta.items() if k not in ("format", "version")}
    multilabel = tmp_path / "multilabel.safetensors"
    save_checkpoint(multilabel, ckpt.forward, meta)

    r = cli("pick", "--model", str(multilabel), str(shapes_folder), "--n", "24", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["task"] == "multilabel"
    predictor = load_predictor(multilabel, log=lambda m: None)
    from imgcls.data.inputs import load_input

    for p in result["picks"][:3]:
        with torch.inference_mode():
            probs = torch.sigmoid(predictor.batch_logits(load_input(p["file"], predictor.preprocessing)[None]))[0]
        t = torch.tensor([0.3, 0.5, 0.7])
        distance = (probs - t).abs() / torch.where(probs >= t, 1 - t, t)
        assert p["label"] == TINY_RECIPE["data"]["shapes"]["classes"][int(distance.argmin())]
        assert p["score"] == pytest.approx(1 - float(distance.min()), abs=1e-6)
    r = cli("pick", "--model", str(multilabel), str(shapes_folder), "--strategy", "least-confidence")
    assert r.returncode == 2 and "use margin" in one_line_error(r)
