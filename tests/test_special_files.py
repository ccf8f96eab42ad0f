"""Only regular files are images: a FIFO or a link to /dev/zero named like an
image is named and refused by data check, predict and train's data scan, and
never read (a FIFO would block, /dev/zero never ends)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")


def _planted(shapes_folder, tmp_path):
    """Two classes of the shapes set, a link to /dev/zero in one, a FIFO in the other."""
    root = tmp_path / "ds"
    for cls in ("circle", "square"):
        shutil.copytree(shapes_folder / cls, root / cls)
    zero, pipe = root / "circle" / "zero.png", root / "square" / "pipe.png"
    os.symlink("/dev/zero", zero)
    os.mkfifo(pipe)
    return root, zero, pipe


@contextlib.contextmanager
def _unblocked(pipe, after: float = 15.0):
    """If a reader still blocks on ``pipe`` after ``after`` s, open and close its
    writing end (again and again) so the reader sees end of file: the test then
    fails on the returned list instead of hanging."""
    fired: list[bool] = []
    stop = threading.Event()

    def watch():
        if stop.wait(after):
            return
        while not stop.wait(0.2):
            try:
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO unless a reader waits
            except OSError:
                continue
            fired.append(True)
            os.close(fd)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield fired
    finally:
        stop.set()
        thread.join()


def _named(text: str, zero, pipe) -> None:
    lines = text.splitlines()
    assert any(str(zero) in line and "character device" in line and "/dev/zero" in line for line in lines)
    assert any(str(pipe) in line and "named pipe" in line for line in lines), text


def test_data_check_names_them_as_unreadable(shapes_folder, tmp_path, cli):
    root, zero, pipe = _planted(shapes_folder, tmp_path)
    with _unblocked(pipe) as fired:
        r = cli("data", "check", str(root), "--json")
    assert not fired, "data check blocked on the FIFO"
    assert r.returncode == 3, r.stderr  # problems found
    unreadable = {e["file"]: e["error"] for e in json.loads(r.stdout)["problems"]["unreadable"]}
    assert set(unreadable) == {str(zero), str(pipe)}
    _named("\n".join(f"{f}: {e}" for f, e in unreadable.items()), zero, pipe)
    assert "Traceback" not in r.stderr


def test_predict_names_them_and_exits_3(shapes_folder, tmp_path, cli, tiny_checkpoint):
    root, zero, pipe = _planted(shapes_folder, tmp_path)
    with _unblocked(pipe) as fired:
        r = cli("predict", str(root), "--model", str(tiny_checkpoint), "--json")
    assert not fired, "predict blocked on the FIFO"
    assert r.returncode == 3, r.stderr  # partial failure: the other 16 were predicted
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert {rec["file"] for rec in records if "error" in rec} == {str(zero), str(pipe)}
    assert sum("label" in rec for rec in records) == 16
    _named(r.stderr, zero, pipe)


def test_train_data_scan_names_them(shapes_folder, tmp_path, cli):
    root, zero, pipe = _planted(shapes_folder, tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {
                "name": "special",
                "data": {"source": "folder", "path": str(root), "image_size": 16},
                "model": {"layers": [{"conv": {"filters": 4, "kernel": 3}}, "global_avg_pool"]},
                "train": {"epochs": 1, "batch_size": 8},
            }
        )
    )
    with _unblocked(pipe) as fired:
        r = cli("train", str(recipe), "--out", str(tmp_path / "run"))
    assert not fired, "train blocked on the FIFO"
    # 2 of 18 unreadable is above data.max_bad_fraction (1%): refused up front, as documented
    assert r.returncode == 2, r.stderr
    assert "max_bad_fraction" in r.stderr
    _named(r.stderr, zero, pipe)


def test_a_file_too_large_for_any_image_is_not_read(tmp_path):
    """A (sparse) file larger than any image within the decompression-bomb
    limit is refused from its size, by the decoder and by data check's hashing."""
    from imgcls.data.check import file_facts
    from imgcls.data.decode import DecodeError, decode_image, max_file_bytes

    big = tmp_path / "big.png"
    with open(big, "wb") as fh:
        fh.truncate(max_file_bytes() + 1)
    with pytest.raises(DecodeError, match="bytes is more than an image within Pillow's decompression-bomb"):
        decode_image(big, 3)
    assert "decompression-bomb" in file_facts(big)["error"]
