"""imgcls data check: finds what is wrong with a dataset, and never changes it."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
from PIL import Image


def _tree(shapes_folder, tmp_path):
    """A train/val copy of the shapes set with one of each problem planted."""
    root = tmp_path / "ds"
    for split in ("train", "val"):
        for cls in ("circle", "square", "triangle"):
            (root / split / cls).mkdir(parents=True)
    for cls in ("circle", "square", "triangle"):
        files = sorted((shapes_folder / cls).glob("*.png"))
        for f in files[:6]:
            shutil.copy(f, root / "train" / cls / f.name)
        for f in files[6:]:
            shutil.copy(f, root / "val" / cls / f.name)
    return root


def _snapshot(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_clean_set_exits_0(shapes_folder, tmp_path, cli):
    root = _tree(shapes_folder, tmp_path)
    r = cli("data", "check", str(root), "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["clean"] and doc["files"] == 24
    assert doc["counts"] == {"train": {c: 6 for c in ("circle", "square", "triangle")},
                             "val": {c: 2 for c in ("circle", "square", "triangle")}}  # fmt: skip


def test_planted_problems_are_found_and_nothing_is_modified(shapes_folder, tmp_path):
    from imgcls.data.check import check_dataset, summary_lines

    root = _tree(shapes_folder, tmp_path)
    train, val = root / "train", root / "val"
    shutil.copy(train / "circle" / "circle_0000.png", train / "circle" / "copy.png")  # duplicate
    shutil.copy(train / "square" / "square_0000.png", train / "triangle" / "odd.png")  # conflicting labels
    Image.open(train / "circle" / "circle_0001.png").save(
        val / "circle" / "leak.jpg", quality=75
    )  # near, leakage
    (train / "square" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.full((16, 16), 4000, dtype=np.uint16)).save(train / "square" / "deep.png")  # 16-bit
    Image.new("RGB", (80, 10), "red").save(train / "circle" / "wide.png")  # aspect + size
    for i in range(20):  # imbalance in train
        shutil.copy(train / "triangle" / "triangle_0000.png", train / "triangle" / f"t{i}.png")
    before = _snapshot(root)

    result = check_dataset(root)
    p = result.problems
    assert _snapshot(root) == before  # read-only
    assert [u["file"].endswith("broken.png") for u in p["unreadable"]] == [True]
    kinds = {g["kind"] for g in p["exact_duplicates"]}
    assert {"duplicate", "conflicting_labels"} <= kinds
    leak = [g for g in p["near_duplicates"] if g["kind"] == "leakage"]
    assert any(any(f["file"].endswith("leak.jpg") for f in g["files"]) for g in leak)
    outliers = {os.path.basename(o["file"]): " ".join(o["reasons"]) for o in p["outliers"]}
    assert "mode I;16" in outliers["deep.png"] and "aspect ratio" in outliers["wide.png"]
    assert p["imbalance"][0]["split"] == "train" and p["imbalance"][0]["largest"] == "triangle"
    assert not result.clean
    text = "\n".join(summary_lines(result))
    assert "broken.png" in text and "leakage" in text and "problems found (exit 3)" in text


def test_cache_reuses_hashes_until_a_file_changes(shapes_folder, tmp_path, monkeypatch):
    from imgcls.data import check

    root = _tree(shapes_folder, tmp_path)
    check.check_dataset(root)
    calls = []
    original = check.file_facts
    monkeypatch.setattr(check, "file_facts", lambda p: calls.append(p) or original(p))
    check.check_dataset(root)
    assert calls == []
    target = root / "train" / "circle" / "circle_0000.png"
    os.utime(target, ns=(1, 1))
    check.check_dataset(root)
    assert calls == [target]


def test_label_errors_with_a_model(shapes_folder, tmp_path, tiny_checkpoint):
    """The confident-learning rule: flagged images are those another class claims
    at least as surely as that class's own images, and more than their label."""
    import torch

    from imgcls.checkpoint import load_checkpoint
    from imgcls.data.check import check_dataset

    ckpt = load_checkpoint(tiny_checkpoint)
    root = _tree(shapes_folder, tmp_path)
    result = check_dataset(root, model=ckpt)
    errors = result.problems["label_errors"]
    for e in errors:
        assert e["suggested"] != e["label"] and e["p_suggested"] >= 0
    # a model that is certain: last layer biased to always say "square"
    with torch.no_grad():
        last = [m for m in ckpt.model.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 0.0, 0.0]))
        last.bias[1] = 10.0
    result = check_dataset(root, model=ckpt)
    # every image gets p(square) ~ 1 = t_square: all circles and triangles are flagged, no square
    flagged = {e["label"] for e in result.problems["label_errors"]}
    assert flagged == {"circle", "triangle"}
    assert all(e["suggested"] == "square" for e in result.problems["label_errors"])


def test_bad_usage_exits_2(tmp_path, cli):
    r = cli("data", "check", str(tmp_path / "nope"))
    assert r.returncode == 2 and "nope" in r.stderr


def test_csv_with_splits_reports_leakage(shapes_folder, tmp_path):
    from imgcls.data.check import check_dataset

    circle = shapes_folder / "circle" / "circle_0000.png"
    square = shapes_folder / "square" / "square_0000.png"
    csv = tmp_path / "labels.csv"
    csv.write_text(f"file,label,split\n{circle},circle,train\n{square},square,train\n{circle},circle,test\n")
    result = check_dataset(csv)
    assert result.counts == {"train": {"circle": 1, "square": 1}, "test": {"circle": 1}}
    (group,) = result.problems["exact_duplicates"]
    assert group["kind"] == "leakage"
    assert result.problems["missing_classes"] == [{"split": "test", "classes": ["square"]}]


def test_a_link_back_into_the_data_set_is_named_and_counted_once(shapes_folder, tmp_path, cli):
    root = _tree(shapes_folder, tmp_path)
    (root / "train" / "square" / "loop").symlink_to(root / "train", target_is_directory=True)
    r = cli("data", "check", str(root), "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["files"] == 24 and doc["counts"]["train"] == {c: 6 for c in ("circle", "square", "triangle")}
    assert doc["problems"]["links_into_dataset"] == [
        {"file": str(root / "train" / "square" / "loop"), "target": str((root / "train").resolve())}
    ]
    assert not doc["problems"]["exact_duplicates"]
    r = cli("data", "check", str(root))
    assert f"{root / 'train' / 'square' / 'loop'} -> {(root / 'train').resolve()}" in r.stdout
