"""User strings are data: class, file and study names are never markup, never forge output lines,
and --json stays valid UTF-8 JSON whatever bytes a file name holds."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from conftest import save_tiny_checkpoint

MARKUP = ["[/bold]", "[bold red]boom[/bold red]", ":cat:"]
WIDE = {"COLUMNS": "200"}  # rich's width: long names stay on one line of a table
LONE_SURROGATE = re.compile(r"\\ud[89a-f][0-9a-f]{2}", re.IGNORECASE)


@pytest.fixture(scope="module")
def markup_checkpoint(tmp_path_factory) -> Path:
    """The tiny model, its three classes named like rich markup and an emoji code."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("markup") / "markup.safetensors", MARKUP)


def _some_pngs(shapes_folder: Path, n: int) -> list[Path]:
    return sorted(shapes_folder.rglob("*.png"))[:n]


def test_markup_class_names_in_evaluate(cli, markup_checkpoint, shapes_folder, tmp_path):
    data = tmp_path / "labels.csv"
    with data.open("w", newline="") as fh:
        writer = csv.writer(fh)
        for i, png in enumerate(_some_pngs(shapes_folder, 6)):
            writer.writerow([str(png), MARKUP[i % 3]])
    r = cli("evaluate", str(markup_checkpoint), str(data), "--out", str(tmp_path / "o"), env=WIDE)
    assert r.returncode == 0, r.stderr
    per_class = r.stdout.split("per class", 1)[1]
    for name in MARKUP:
        assert name in per_class  # the literal name: not bold, not an emoji, not a MarkupError
    assert "🐱" not in r.stdout


def test_markup_class_names_in_predict(cli, markup_checkpoint, shapes_folder):
    files = [str(p) for p in _some_pngs(shapes_folder, 4)]
    r = cli("predict", *files, "--model", str(markup_checkpoint), "--top-k", "3", env=WIDE)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if "circle_000" in line]
    assert len(rows) == 4
    for row in rows:  # each row names all three classes (top-1 and the next 2), literally
        assert all(name in row for name in MARKUP), row


def test_markup_study_name_in_the_tune_table(cli, monkeypatch, tmp_path):
    """The table of `imgcls tune` (its study name, the space's keys and values) shows them literally."""
    from imgcls import tune

    def fake_tune(recipe, **kwargs):
        trial = tune.TrialRow(0, "COMPLETE", 0.5, 1, {"train.optimizer.name": "[red]x[/red]"}, "r/0", 1.0)
        return tune.TuneResult(
            kwargs["study"], tmp_path, "sqlite://", "val_acc", "maximize", [trial], trial, None, None
        )

    monkeypatch.setattr(tune, "tune", fake_tune)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\n")
    for study in ("[/bold]", "[bold]study"):
        r = cli("tune", str(recipe), "--trials", "1", "--study", study, env=WIDE)
        assert r.returncode == 0, r.stderr
        assert f"study {study}: val_acc" in r.stdout and "[red]x[/red]" in r.stdout


@pytest.mark.parametrize(
    ("command", "placeholder"),
    [
        ("train", "(default runs/<name>/<n>)"),
        ("explain", "(default <run>/explain/)"),
        ("tune", "(default: <recipe name>-tune)"),
        ("evaluate", "(default <run>/eval/)"),
        ("export", "e.g. <run>/model.onnx"),
    ],
)
def test_help_keeps_its_placeholders(cli, command, placeholder):
    r = cli(command, "--help", env=WIDE)
    assert r.returncode == 0 and placeholder in r.stdout


@pytest.fixture
def odd_names(shapes_folder, tmp_path) -> Path:
    """The shapes, plus copies (exact duplicates) named with a newline, with bytes that are not
    UTF-8 and with a backslash, and an unreadable file named with a newline and markup."""
    root = tmp_path / "data"
    shutil.copytree(shapes_folder, root)
    good = sorted((root / "circle").glob("*.png"))
    shutil.copy(good[0], root / "circle" / "new\nline.png")
    shutil.copy(os.fsencode(good[1]), os.fsencode(root / "circle") + b"/bad\xffname.png")
    shutil.copy(good[2], root / "circle" / "back\\slash.png")
    (root / "square" / "[bold]forged\nline.png").write_text("not an image")
    return root


def test_data_check_one_finding_per_line(cli, odd_names):
    r = cli("data", "check", str(odd_names))
    assert r.returncode == 3, r.stderr
    lines = r.stdout.splitlines()
    unreadable = lines[lines.index("unreadable files: 1") + 1]
    assert unreadable.startswith(f'  "{odd_names}/square/[bold]forged\\nline.png": ')
    assert f'"{odd_names}/circle/new\\nline.png" (all/circle)' in r.stdout
    assert f'"{odd_names}/circle/bad\\xffname.png" (all/circle)' in r.stdout
    assert f'"{odd_names}/circle/back\\\\slash.png" (all/circle)' in r.stdout
    assert not any(line.startswith("line.png") for line in lines)  # no finding split over two lines


def test_data_check_json_is_strict_utf8(cli, odd_names):
    r = cli("data", "check", str(odd_names), "--json")
    assert r.returncode == 3, r.stderr
    assert not LONE_SURROGATE.search(r.stdout)  # what strict parsers (serde_json, Go's, ...) reject
    r.stdout.encode("utf-8")
    result = json.loads(r.stdout)
    files = [f for g in result["problems"]["exact_duplicates"] for f in g["files"]]
    odd = {f["file"]: f for f in files if "name.png" in f["file"] or "line.png" in f["file"]}
    bad = odd[f"{odd_names}/circle/bad\\xffname.png"]
    assert base64.b64decode(bad["file_bytes"]) == os.fsencode(odd_names) + b"/circle/bad\xffname.png"
    assert "file_bytes" not in odd[f"{odd_names}/circle/new\nline.png"]  # valid UTF-8: exact as it is


def _odd_files(odd_names: Path) -> list[str]:
    return [
        str(odd_names / "circle" / "new\nline.png"),
        os.fsdecode(os.fsencode(odd_names) + b"/circle/bad\xffname.png"),
    ]


def test_predict_json_csv_and_table_with_odd_names(cli, tiny_checkpoint, odd_names):
    files = _odd_files(odd_names)
    r = cli("predict", *files, "--model", str(tiny_checkpoint), "--json")
    assert r.returncode == 0, r.stderr
    assert not LONE_SURROGATE.search(r.stdout)
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["file"] for rec in records] == [files[0], f"{odd_names}/circle/bad\\xffname.png"]
    assert "file_bytes" not in records[0]
    assert base64.b64decode(records[1]["file_bytes"]) == os.fsencode(files[1])

    r = cli("predict", *files, "--model", str(tiny_checkpoint), "--csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["file"] for row in rows] == [files[0], f"{odd_names}/circle/bad\\xffname.png"]

    r = cli("predict", *files, "--model", str(tiny_checkpoint), env=WIDE)
    assert r.returncode == 0, r.stderr
    assert '"' + str(odd_names) + '/circle/new\\nline.png"' in r.stdout
    assert '"' + str(odd_names) + '/circle/bad\\xffname.png"' in r.stdout


def test_predict_null_separated_stdin(cli, tiny_checkpoint, odd_names):
    files = [*_odd_files(odd_names), str(odd_names / "circle" / "back\\slash.png")]
    stdin = b"".join(os.fsencode(f) + b"\0" for f in files)
    r = cli("predict", "-", "--null", "--model", str(tiny_checkpoint), "--json", input=stdin)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec.get("file_bytes") for rec in records][1] == base64.b64encode(os.fsencode(files[1])).decode()
    assert [rec["file"] for rec in records] == [files[0], f"{odd_names}/circle/bad\\xffname.png", files[2]]
    r = cli("predict", files[2], "-0", "--model", str(tiny_checkpoint))
    assert r.returncode == 2 and "give - as a PATH" in r.stderr


def test_cache_list_at_80_columns_keeps_entries_apart(cli, tmp_path, monkeypatch):
    from PIL import Image

    from imgcls.data.cache import load_split
    from imgcls.recipe import DataSpec

    monkeypatch.setenv("IMGCLS_CACHE", str(tmp_path / "root"))
    sources = []
    for version in ("v2", "v3"):  # long sources that differ only at the very end
        source = tmp_path / "datasets" / "holiday-photos-2025" / "cleaned" / f"train_images_{version}"
        source.mkdir(parents=True)
        items = []
        for i in range(2):
            Image.new("L", (6, 6), i * 90).save(source / f"{i}.png")
            items.append((source / f"{i}.png", i))
        load_split(items, DataSpec(image_size=4, cache="disk"), split="train", source=source)
        sources.append(str(source))
    r = cli("cache", "list", env={"COLUMNS": "80"})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines)
    entries = []  # a row starts where the key column is filled; its cells may go on over the next lines
    for line in lines:
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == 6 and cells[0]:
            entries.append(cells)
        elif len(cells) == 6:
            entries[-1] = [" ".join(filter(None, pair)) for pair in zip(entries[-1], cells, strict=True)]
    # a folded path goes on without a space, a wrapped date with one
    assert sorted(e[1].replace(" ", "") for e in entries) == sorted(sources)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d", e[5]) for e in entries)
    keys = json.loads(cli("cache", "list", "--json").stdout)
    assert sorted(e[0] for e in entries) == sorted(k["key"][:12] for k in keys)


def test_an_error_naming_a_file_stays_one_line(cli, tiny_checkpoint, tmp_path):
    r = cli("predict", str(tmp_path / "no\nsuch[/bold].png"), "--model", str(tiny_checkpoint))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f'error: no input files found ("{tmp_path}/no\\nsuch[/bold].png": no image file matches this pattern)'
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("plain name.png", "plain name.png"),
        ("[bold]x.png", "[bold]x.png"),  # markup is the renderer's business (rich Text), not quoting's
        ("a\tb\r\n.png", '"a\\tb\\r\\n.png"'),
        ("esc\x1b[31m.png", '"esc\\x1b[31m.png"'),
        ("rtl\u202egnp.exe", '"rtl\\u202egnp.exe"'),  # a bidi override would reverse what follows
        ("c1\x85.png", '"c1\\u0085.png"'),  # a character, not the byte 0x85
        (os.fsdecode(b"raw\x85.png"), '"raw\\x85.png"'),  # the byte 0x85
        ('say "hi"\\.png', '"say \\"hi\\"\\\\.png"'),
    ],
)
def test_shown_quotes_only_what_could_forge_or_hide_output(name, expected):
    from imgcls.text import shown

    assert shown(name) == expected
