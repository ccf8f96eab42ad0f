"""`imgcls export` end to end: files, exit codes, --json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest


def test_export_torchscript_json(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "deploy" / "model.pt"
    out.parent.mkdir()  # a missing folder is refused (test_unusable_out_is_refused_up_front_exit_2)
    result = cli("export", str(tiny_checkpoint), "--format", "torchscript", "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # stdout holds only the JSON; progress went to stderr
    assert report["path"] == str(out) and out.is_file()
    assert report["format"] == "torchscript" and report["exporter"] == "torch.jit.trace"
    assert [c["batch_size"] for c in report["checks"]] == [1, 3]
    assert all(c["ok"] and c["top1_agree"] == c["images"] for c in report["checks"])
    assert report["tolerance"] == {
        "logit_rtol": 1e-3,
        "logit_atol": 1e-4,
        "prob_atol": 1e-4,
        "fp32_factor": 4.0,
    }
    assert all(0 <= c["torch_fp32_error"] < 1e-4 for c in report["checks"])  # a well-conditioned model
    assert "checking against PyTorch" in result.stderr


def test_export_onnx_static_batch_human_output(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "m.onnx"
    result = cli(
        "export", str(tiny_checkpoint), "--out", str(out), "--static-batch", "--batch-size", "2", "--opset", "18", "-q"
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote {out} (torch.onnx (dynamo), opset 18, batch 2)"
    assert lines[1].startswith("matches PyTorch on ") and "at batch size 2:" in lines[1]


def test_existing_file_is_refused_with_exit_2(cli, tiny_checkpoint, tmp_path):
    out = tmp_path / "m.pt"
    out.write_text("mine")
    result = cli("export", str(tiny_checkpoint), "-f", "torchscript", "--out", str(out))
    assert result.returncode == 2
    assert "already exists; pass --force" in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == "mine"


@pytest.mark.parametrize(
    "args, message",
    [
        (["-f", "tflite"], "unknown export format"),
        ([], "give --format"),
        (["-f", "onnx", "--out", "x.pt"], "must end in .onnx"),
    ],
)
def test_bad_usage_exit_2(cli, tiny_checkpoint, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = cli("export", str(tiny_checkpoint), *args)
    assert result.returncode == 2 and message in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_exit_2(cli, tmp_path):
    result = cli("export", str(tmp_path / "nope"), "-f", "onnx")
    assert result.returncode == 2 and "no such checkpoint" in result.stderr


def test_failed_parity_exit_1_and_no_file(cli, tiny_checkpoint, tmp_path, monkeypatch):
    from imgcls.export import writers as ex

    monkeypatch.setattr(ex, "TOLERANCE", ex.Tolerance(logit_rtol=-1, logit_atol=-1, prob_atol=-1))
    out = tmp_path / "m.pt"
    result = cli("export", str(tiny_checkpoint), "-f", "torchscript", "--out", str(out))
    assert result.returncode == 1
    assert "does not match PyTorch" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_extra_exit_2(cli, tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    result = cli("export", str(tiny_checkpoint), "-f", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 2
    assert "ONNX export needs onnx and onnxruntime: pip install 'imgcls[onnx]'" in result.stderr


@pytest.mark.parametrize("case", ["missing parent", "parent is a file", "a folder", "read-only folder"])
def test_unusable_out_is_refused_up_front_exit_2(cli, tiny_checkpoint, tmp_path, case):
    """As train --out: one line, exit 2, before any exporting; a missing parent
    folder is refused, not created."""
    import os

    (tmp_path / "file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    read_only = locked
    if os.access(locked, os.W_OK):  # root writes anywhere, but not into /proc/sys (Linux)
        read_only = Path("/proc/sys")
        if case == "read-only folder" and (not read_only.is_dir() or os.access(read_only, os.W_OK)):
            pytest.skip("no read-only folder to test with")
    out = {
        "missing parent": tmp_path / "no" / "such" / "m.pt",
        "parent is a file": tmp_path / "file" / "m.pt",
        "a folder": tmp_path / "dir.pt",
        "read-only folder": read_only / "m.pt",
    }[case]
    (tmp_path / "dir.pt").mkdir()
    result = cli("export", str(tiny_checkpoint), "-f", "torchscript", "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert str(out) in result.stderr and "exporting" not in result.stderr
    assert not (tmp_path / "no").exists()
    assert sorted(p.name for p in locked.iterdir()) == []
