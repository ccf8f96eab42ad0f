"""`imgcls compare`: one row per network, measured by the summarize engine on the meta device."""

from __future__ import annotations

import csv
import io
import json

import pytest

TINY = """
name: tiny-net
model:
  input_shape: 3x16x16
  num_classes: 10
  layers:
    - conv: {filters: 4, kernel: 3, padding: 1, activation: relu}
    - residual: {layers: [conv: {filters: 4, kernel: 3, padding: 1}], activation: relu}
    - global_avg_pool
    - dense: 10
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def test_rows_for_names_and_recipes(cli, tiny):
    result = cli("compare", "alexnet", "resnet18", str(tiny), "--json")
    assert result.returncode == 0, result.stderr
    alexnet, resnet18, mine = json.loads(result.stdout)

    assert alexnet["year"] == 2012 and alexnet["paper"].startswith("Krizhevsky")
    assert alexnet["params"] == 61_100_840 and alexnet["macs"] == 714_682_664  # as `imgcls summarize`
    assert alexnet["depth"] == 8 and resnet18["depth"] == 18  # the numbers in the names
    assert (alexnet["top1"], alexnet["top1_weights"]) == (56.522, "IMAGENET1K_V1")
    assert resnet18["year"] == 2015 and resnet18["top1"] == 69.758
    assert resnet18["input_shape"] == [3, 224, 224]

    # a layer recipe: its own shape; no year, paper or borrowed accuracy
    assert mine["name"] == "tiny-net" and mine["input_shape"] == [3, 16, 16]
    assert (mine["year"], mine["paper"], mine["top1"]) == (None, None, None)
    assert mine["params"] == (4 * 27 + 4) + (4 * 36 + 4) + (4 * 10 + 10)
    # MACs: two 3x3 convs with bias on 16x16, then the dense layer
    assert mine["macs"] == (256 * 4 * 27 + 256 * 4) + (256 * 4 * 36 + 256 * 4) + (4 * 10 + 10)
    assert mine["depth"] == 3


def test_one_input_for_all_csv_and_table(cli, tiny):
    result = cli("compare", "resnet18", str(tiny), "--input", "3x32x32", "--csv")
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [r["name"] for r in rows] == ["resnet18", "tiny-net"]
    assert {r["input_shape"] for r in rows} == {"3x32x32"}
    assert rows[1]["top1"] == "" and rows[0]["top1"] == "69.758"

    table = cli("compare", "resnet18", str(tiny))
    assert table.returncode == 0, table.stderr
    assert "resnet18" in table.stdout and "69.8%" in table.stdout and "tiny-net" in table.stdout


def test_plot(cli, tiny, tmp_path):
    out = tmp_path / "figs" / "compare.png"
    missing = cli("compare", "alexnet", "--plot", str(out))  # as export --out: no folder made for a typo
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "create it first" in missing.stderr
    assert not out.parent.exists()
    out.parent.mkdir()
    result = cli("compare", "alexnet", "resnet18", str(tiny), "--plot", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not plotted (no top-1): tiny-net" in result.stderr
    assert [p.name for p in out.parent.iterdir()] == ["compare.png"]  # no temporary file left

    nothing = cli("compare", str(tiny), "--plot", str(tmp_path / "none.png"))
    assert nothing.returncode == 2 and "nothing to plot" in nothing.stderr
    assert not (tmp_path / "none.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["alexnet", "not_a_net"], "unknown architecture 'not_a_net'"),
        (["alexnet", "--json", "--csv"], "give --json or --csv, not both"),
        (["missing.yaml"], "missing.yaml: no such recipe file"),
    ],
)
def test_bad_input_is_one_line_exit_2(cli, args, message):
    result = cli("compare", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
