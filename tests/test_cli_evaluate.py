"""`imgcls evaluate` end to end, as a user runs it."""

from __future__ import annotations

import csv
import json
import shutil


def test_json_default_split_and_png(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "eval"
    r = cli("evaluate", str(tiny_checkpoint), "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    for key in (
        "accuracy",
        "top_k_accuracy",
        "loss",
        "macro",
        "weighted",
        "per_class",
        "confusion",
        "confused_pairs",
        "files",
    ):
        assert key in result
    assert result["top_k"] == 3
    assert (out / "confusion.png").is_file()
    assert str(out / "confusion.png") in r.stderr  # says where


def test_table_on_a_folder_with_misclassified(cli, tiny_checkpoint, shapes_folder, tmp_path):
    wrong = tmp_path / "wrong.csv"
    r = cli(
        "evaluate",
        str(tiny_checkpoint),
        str(shapes_folder),
        "--misclassified",
        str(wrong),
        "--out",
        str(tmp_path / "o"),
    )
    assert r.returncode == 0, r.stderr
    for text in ("accuracy", "per class", "confusion", "circle", "triangle"):
        assert text in r.stdout
    rows = list(csv.DictReader(wrong.open()))
    assert rows and set(rows[0]) == {"file", "true", "predicted", "confidence"}
    assert all(row["true"] != row["predicted"] for row in rows)


def test_unknown_class_exit_2(cli, tiny_checkpoint, shapes_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_folder, data)
    shutil.copytree(data / "circle", data / "hexagon")
    r = cli("evaluate", str(tiny_checkpoint), str(data), "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "hexagon" in r.stderr and "Traceback" not in r.stderr


def test_skipped_images_exit_3_after_the_full_report(cli, tiny_checkpoint, shapes_folder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(shapes_folder, data)
    (data / "circle" / "broken.png").write_bytes(b"not a png")
    (data / "square" / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    r = cli("evaluate", str(tiny_checkpoint), str(data), "--json", "--out", str(tmp_path / "o"))
    assert r.returncode == 3, r.stderr
    result = json.loads(r.stdout)  # stdout is complete
    assert result["skipped"] == 2 and result["samples"] == 24 and "confusion" in result
    assert "2 of 26 images could not be read" in r.stderr and "broken.png" in r.stderr
    assert (tmp_path / "o" / "metrics.json").is_file() and "Traceback" not in r.stderr
    table = cli("evaluate", str(tiny_checkpoint), str(data), "--out", str(tmp_path / "o"))
    assert table.returncode == 3 and "per class" in table.stdout and "2 unreadable" in table.stdout


def test_no_readable_image_exit_2(cli, tiny_checkpoint, tmp_path):
    data = tmp_path / "data"
    for name in ("circle", "square"):
        (data / name).mkdir(parents=True)
        (data / name / "0.png").write_bytes(b"not a png")
    r = cli("evaluate", str(tiny_checkpoint), str(data), "--json", "--out", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "none of the 2 images could be read" in r.stderr and "Traceback" not in r.stderr


def test_unusable_outputs_are_refused_before_the_work(cli, tiny_checkpoint, tmp_path):
    """--out and --misclassified as train --out: a missing parent folder or a file
    in the way is one line, exit 2, before any image is read; nothing is created."""
    (tmp_path / "file").write_text("x")
    cases = [
        ("--out", tmp_path / "no" / "such" / "eval", "create it first"),
        ("--out", tmp_path / "file", "not a folder"),
        ("--misclassified", tmp_path / "no" / "wrong.csv", "create it first"),
        ("--misclassified", tmp_path, "is a folder"),
    ]
    for option, path, message in cases:
        r = cli("evaluate", str(tiny_checkpoint), option, str(path))
        assert r.returncode == 2, (option, path, r.stderr)
        assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "x"
