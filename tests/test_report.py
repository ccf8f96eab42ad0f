"""report.html: written by train, refreshed by evaluate, rendered by a real browser."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from conftest import TINY_RECIPE

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip
EPOCH_ENDS: list[float] = []  # the run fixture's wall time at each epoch's end, from train's start
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (Debian: apt-get install chromium)"
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (train writes report.html), then evaluated (which refreshes it)."""
    from imgcls.cli.evaluate import evaluate_steps as evaluate
    from imgcls.recipe import recipe_from_dict
    from imgcls.training import train

    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["train"]["epochs"] = 2
    out = tmp_path_factory.mktemp("report") / "run"
    ends: list[float] = []  # perf_counter at each epoch's end, after its files are written
    started = time.perf_counter()
    train(
        recipe_from_dict(recipe),
        out=out,
        log=lambda m: None,
        on_epoch_end=lambda _: ends.append(time.perf_counter()),
    )
    EPOCH_ENDS[:] = [t - started for t in ends]
    written_by_train = (out / "report.html").read_text()
    evaluation = evaluate(out, log=lambda m: None)
    return out, written_by_train, evaluation


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_train_writes_and_evaluate_refreshes_a_self_contained_report(run):
    out, written_by_train, evaluation = run
    html = (out / "report.html").read_text()
    assert "Training curves" in written_by_train and "Per class" not in written_by_train
    assert "Per class" in html and "Confusion matrix" in html
    # self-contained: no URL is fetched (links to http(s) or protocol-relative)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html and "@import" not in html and "url(" not in html
    assert f"{evaluation.report['accuracy']:.4f}" in html
    # the error gallery, next to the confusion PNG, is in the report
    assert evaluation.misclassified, "the 2-epoch tiny model gets some wrong"
    assert (out / "eval" / "errors.png").is_file() and 'id="gallery"' in html


@pytest.mark.slow
def test_report_command_and_bad_usage(run, tmp_path, cli):
    from imgcls.errors import UsageError
    from imgcls.report import write_report

    out, _, _ = run
    (out / "report.html").unlink()
    r = cli("report", str(out))
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == out / "report.html" and (out / "report.html").is_file()
    with pytest.raises(UsageError, match="run folder"):
        write_report(tmp_path)


@needs_chromium
@pytest.mark.slow
def test_report_renders_in_headless_chromium(run, tmp_path):
    """Chromium opens the page: the curves image decodes with a non-zero size, the
    metrics table shows the run's accuracy, a header click sorts the table,
    and a screenshot is taken at laptop and phone widths."""
    out, _, evaluation = run
    html = (out / "report.html").read_text()
    probe = """<script>window.addEventListener("load", function () {
      var img = document.getElementById("curves");
      document.body.setAttribute("data-curves", img.naturalWidth + "x" + img.naturalHeight);
      var table = document.getElementById("per-class");
      table.querySelectorAll("th")[3].click(); table.querySelectorAll("th")[3].click();  // f1, descending
      document.body.setAttribute("data-first", table.tBodies[0].rows[0].cells[0].textContent);
      document.body.setAttribute("data-width", document.documentElement.scrollWidth);
    });</script></body>"""
    page = tmp_path / "probe.html"
    page.write_text(html.replace("</body>", probe))
    r = _chromium("--virtual-time-budget=5000", "--dump-dom", page.as_uri(), profile=tmp_path / "p1")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    width, height = map(int, re.search(r'data-curves="(\d+)x(\d+)"', dom).groups())
    assert width > 0 and height > 0
    metrics = re.search(r'<table id="metrics".*?</table>', dom, re.S).group(0)
    assert f"{evaluation.report['accuracy']:.4f}" in metrics
    table = re.search(r'<table id="per-class".*?</table>', dom, re.S).group(0)
    assert 'aria-sort="descending"' in table  # set by the page's own sorting script
    f1 = [float(v) for v in re.findall(r"<tr>(?:<td[^>]*>[^<]*</td>){3}<td[^>]*>([^<]*)</td>", table)]
    assert len(f1) == len(evaluation.report["per_class"]) and f1 == sorted(f1, reverse=True)

    for name, size in (("laptop", "1280,2000"), ("phone", "390,1600")):
        shot = tmp_path / f"{name}.png"
        r = _chromium(f"--window-size={size}", f"--screenshot={shot}", (out / "report.html").as_uri(),
                      profile=tmp_path / f"p-{name}")  # fmt: skip
        assert r.returncode == 0 and shot.stat().st_size > 10_000, r.stderr[-2000:]
        from PIL import Image

        im = Image.open(shot)
        assert im.size == tuple(map(int, size.split(",")))
        import numpy as np

        assert len(np.unique(np.asarray(im.convert("L")))) > 8  # something was drawn


def test_report_skips_missing_sections(tiny_checkpoint, tmp_path):
    """A run folder with only a recipe and metrics still gets a report; absent parts are left out."""
    from imgcls.report import build_report

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: tiny\ntrain: {device: cpu}\n")
    (run / "metrics.csv").write_text(
        "epoch,train_loss,train_acc,val_loss,val_acc,seconds\n1,1.0,0.5,0.9,0.625,1.5\n"
    )
    (run / "data-check.json").write_text(
        json.dumps({"root": "x", "files": 3, "problems": {"unreadable": [1]}})
    )
    html = build_report(run)
    assert "0.6250" in html and "Confusion" not in html and "Training curves" not in html
    assert "Data check" in html and "unreadable" in html and "Explanations" not in html
    (run / "explain").mkdir()
    shutil.copy(
        Path(__file__).parent.parent / "docs" / "gradcam.png", run / "explain" / "star.gradcam.star.png"
    )
    html = build_report(run)
    assert "Explanations" in html and "star.gradcam.star.png" in html and "data:image/png;base64," in html


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("metrics.csv", b"abc\n", "metrics.csv:1: no 'epoch' column"),
        (
            "metrics.csv",
            b"epoch,val_acc,seconds\n1,0.5,1\n2,abc,1\n",
            "metrics.csv:3: val_acc: 'abc' is not a number",
        ),
        ("metrics.csv", b"epoch,val_acc,seconds\n1,\xff,1\n", "metrics.csv:2: not UTF-8 text"),
        ("recipe.yaml", b"name: tiny\ntrain: [1, 2\n", "recipe.yaml:3: not valid YAML"),
        ("summary.json", b"[1, 2, 3]", "summary.json:1: not a JSON object (a list)"),
        ("summary.json", b'{"rows": [1]}', "summary.json: not what imgcls writes there"),
    ],
)
def test_a_corrupt_run_file_is_one_line_naming_it(tmp_path, cli, name, content, message):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: tiny\ntrain: {device: cpu}\n")
    (run / "metrics.csv").write_text("epoch,val_acc,seconds\n1,0.5,1.5\n")
    (run / name).write_bytes(content)
    r = cli("report", str(run))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error:") and r.stderr.count("\n") == 1, r.stderr
    assert str(run / name) in r.stderr and message in r.stderr
    assert not (run / "report.html").exists()


@pytest.mark.slow
def test_timings_are_the_runs_wall_time(run, cli):
    """metrics.csv's elapsed is the run's wall time at each epoch (data preparation,
    validation, checkpoints in it), not only the training steps' (a tiny run's
    steps take a few ms: `runs` said 0 and the report 0.0 s for an 8 s run)."""
    import csv

    out, _, _ = run
    with open(out / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    elapsed = [float(r["elapsed"]) for r in rows]
    steps = [float(r["seconds"]) for r in rows]
    for e, wall in zip(elapsed, EPOCH_ENDS, strict=True):
        assert 0.5 * wall <= e <= wall  # before the epoch's checkpoints; most of the time to there
    assert elapsed[1] - elapsed[0] >= steps[1] and elapsed[0] > steps[0]
    r = cli("runs", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["seconds"] == round(elapsed[-1], 3) > 0  # 0.045 s was rounded to 0.0
    html = (out / "report.html").read_text()
    shown = f"{elapsed[-1]:.2g} s" if elapsed[-1] < 10 else f"{elapsed[-1]:.0f} s"  # never "0.0 s"
    assert f"training time {shown} over 2 epochs" in html


def test_final_metrics_show_balanced_accuracy(tmp_path):
    from imgcls.report import build_report

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "recipe.yaml").write_text("name: tiny\n")
    (run / "metrics.csv").write_text("epoch,val_acc,seconds,elapsed\n1,0.5,0.004,3.2\n")
    doc = {"data": "val", "accuracy": 0.9, "balanced_accuracy": 0.6125, "loss": 0.3, "samples": 40}
    (run / "eval" / "metrics.json").write_text(json.dumps(doc))
    html = build_report(run)
    metrics = re.search(r'<table id="metrics".*?</table>', html, re.S).group(0)
    assert re.search(r"<td[^>]*>balanced accuracy</td><td[^>]*>0\.6125</td>", metrics), metrics
    assert "training time 3.2 s over 1 epochs, of which 0.004 s in training steps" in html


def test_confusion_title_and_gallery_captions_are_not_clipped(tiny_checkpoint, shapes_folder, tmp_path):
    """The report's pictures keep all their text: a long title (the data's path)
    and a class name wider than a gallery tile wrap instead of running off the
    edge, so every edge of the PNG is background."""
    import numpy as np
    from PIL import Image

    from imgcls.checkpoint import load_checkpoint
    from imgcls.evaluate import save_confusion_png
    from imgcls.explain import write_error_gallery

    def edges(png: Path) -> int:  # the darkest pixel of a 3-pixel band along the edges
        a = np.asarray(Image.open(png).convert("L"))
        return int(min(a[:, :3].min(), a[:, -3:].min(), a[:3].min(), a[-3:].min()))

    long = "a_class_name_much_wider_than_its_tile"
    title = "best.safetensors on the run's val split (/home/someone/.cache/imgcls/shapes/2bdf12372ad30c7c)"
    save_confusion_png(tmp_path / "c.png", [[2, 1, 0], [0, 3, 0], [1, 0, 2]], ["circle", long, "triangle"], title)
    assert edges(tmp_path / "c.png") > 200
    wrong = [
        {"file": str(shapes_folder / "circle" / "circle_0000.png"), "true": "circle", "predicted": long,
         "confidence": 0.61}
    ]  # fmt: skip
    png = write_error_gallery(tmp_path / "e.png", load_checkpoint(tiny_checkpoint), wrong, [
        {"true": "circle", "predicted": long}
    ])  # fmt: skip
    assert edges(png) > 200
