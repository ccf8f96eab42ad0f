"""Ctrl-C while `imgcls train` decodes its data: a real process, a real SIGINT."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import TINY_RECIPE
from PIL import Image

N_FILES = 1_500  # ~2-4 ms each (512x512 down to 8x8): a few seconds of decoding


def _folder(root) -> None:
    """N_FILES PNGs in 2 classes: 512x512 gradients (2 KB on disk, slow to
    decode and shrink), written as the same bytes (fast)."""
    a = np.tile((np.arange(512) // 2).astype(np.uint8)[None, :, None], (512, 1, 3))
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
    flags = os.O_WRONLY | os.O_CREAT
    for i in range(N_FILES):
        fd = os.open(root / f"c{i % 2}" / f"{i:06d}.png", flags, 0o644)
        os.write(fd, buf.getvalue())
        os.close(fd)


@pytest.mark.slow
def test_ctrl_c_during_decoding_leaves_no_cache_entry_and_no_run(tmp_path):
    _folder(tmp_path / "data")
    recipe = {**TINY_RECIPE, "data": {"source": "folder", "path": "data", "image_size": 8, "channels": 1}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cache = tmp_path / "cache"
    err_path = tmp_path / "stderr.txt"
    env = {**os.environ, "IMGCLS_CACHE": str(cache), "IMGCLS_DECODE": "processes"}
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            # default run folder (runs/tiny/<n>), made only after the data is ready
            [sys.executable, "-m", "imgcls", "train", "r.yaml"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,  # its own process group, as in a terminal
        )
        try:
            # Decoding has begun once the entry's temporary folder exists.
            deadline = time.monotonic() + 60
            while not list(cache.glob("decoded/.tmp-*")):
                assert proc.poll() is None, err_path.read_text()
                assert time.monotonic() < deadline, "decoding never started"
                time.sleep(0.02)
            time.sleep(0.5)  # into the worker pool
            # Ctrl-C in a terminal: SIGINT to the whole group (workers too)
            os.killpg(proc.pid, signal.SIGINT)
            stdout, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = err_path.read_text()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().splitlines()[-1].endswith("interrupted")
    assert [line for line in stderr.splitlines() if "interrupt" in line.lower()] == [
        stderr.strip().splitlines()[-1]
    ]
    assert stdout == ""
    # (the entry's empty lock file may stay: it is not an entry, see imgcls.data.cache)
    found = (cache / "decoded").iterdir() if (cache / "decoded").exists() else []
    left = sorted(p.name for p in found if p.name != ".locks")
    assert left == [], f"left in the cache: {left}"
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_while_the_decode_server_starts_is_not_lost(tmp_path):
    """A SIGINT landing in the few ms the decode workers' server takes to fork
    and exec is raised once it is started, not dropped (it used to be: this
    process ignored SIGINT for that moment)."""
    script = """
import multiprocessing.util, os, signal
from imgcls.data import batch_decode

spawn = multiprocessing.util.spawnv_passfds
def spawn_during_ctrl_c(*args):
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C lands while the server is being started
    return spawn(*args)
multiprocessing.util.spawnv_passfds = spawn_during_ctrl_c
try:
    batch_decode._prestart()
except KeyboardInterrupt:
    print("raised")
else:
    print("lost")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "raised", done.stderr
