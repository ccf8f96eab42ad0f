"""Shared fixtures: tiny generated data and checkpoints, never the network."""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

TINY_RECIPE = {
    "name": "tiny",
    "data": {
        "source": "shapes",
        "image_size": 16,
        "shapes": {"classes": ["circle", "square", "triangle"], "per_class": 8, "image_size": 16},
    },
    "model": {
        "layers": [
            {"conv": {"filters": 4, "kernel": 3, "padding": "same", "activation": "relu"}},
            {"maxpool": 2},
            {"conv": {"filters": 8, "kernel": 3, "padding": "same", "activation": "relu"}},
            "global_avg_pool",
        ]
    },
    "train": {"epochs": 1, "batch_size": 8},
}

# two convs and a flatten: enough for 8x8 digits or a 2x2 grid of cells
SMALL_CNN = [
    {"conv": {"filters": 16, "kernel": 3, "padding": "same", "activation": "relu"}},
    {"maxpool": 2},
    {"conv": {"filters": 32, "kernel": 3, "padding": "same", "activation": "relu"}},
    "flatten",
]


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Built-in data goes to a temporary cache, not the user's ~/.cache."""
    os.environ["IMGCLS_CACHE"] = str(tmp_path_factory.mktemp("imgcls-cache"))
    yield


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory) -> Path:
    """An ImageFolder of PNGs: 3 classes x 8 images, 16x16."""
    from imgcls.data.shapes import write_shapes
    from imgcls.recipe import ShapesSpec

    out = tmp_path_factory.mktemp("shapes") / "shapes"
    return write_shapes(out, ShapesSpec(classes=["circle", "square", "triangle"], per_class=8, image_size=16))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """An untrained but complete checkpoint for TINY_RECIPE (3 classes, 3x16x16)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


def save_tiny_checkpoint(path: Path, classes: list[str] | None = None, task: str | None = None) -> Path:
    """TINY_RECIPE's untrained model (seed 0) saved at ``path``, one output per
    class of ``classes`` (default circle, square, triangle); ``task``: multilabel."""
    import torch

    from imgcls.checkpoint import save_checkpoint
    from imgcls.models.build import build_model
    from imgcls.recipe import recipe_from_dict, recipe_to_dict

    recipe = recipe_from_dict(TINY_RECIPE)
    torch.manual_seed(0)
    classes = classes or ["circle", "square", "triangle"]
    model = build_model(recipe.model, recipe.input_shape(), len(classes))
    save_checkpoint(
        path,
        model,
        {
            "recipe": recipe_to_dict(recipe),
            "classes": classes,
            **({"task": task} if task else {}),
            "input_shape": [3, 16, 16],
            "preprocessing": {
                "image_size": [16, 16],
                "channels": 3,
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
                "resize": "stretch",
            },
            "epoch": 0,
        },
    )
    return path


def run_cli(
    *args: str, input: str | None = None, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real command in a child process, as a user would.

    For what only a real process shows: signals, exit codes set by the
    interpreter, which modules get imported, a closed pipe. Everything else
    uses `invoke_cli` (the `cli` fixture), which is ~2 s faster per call.
    """
    return subprocess.run(
        [sys.executable, "-m", "imgcls", *args],
        capture_output=True,
        text=True,
        input=input,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=600,
    )


# A fresh interpreter's warning filters (Python's documented defaults): inside
# pytest the filters record warnings instead, and a test of "no raw library
# warning reaches the terminal" must see them on stderr as a user would.
_DEFAULT_WARNING_FILTERS = [
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
]


def _show_warning(message, category, filename, lineno, file=None, line=None):
    # resolved at call time: the runner's stderr, as the real process's stderr
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _process_like_globals():
    """Undo everything a command changes in this interpreter, as a process exit would.

    The command's own state (imgcls.cli._state, the Ctrl-C record of imgcls.interrupts), signal handlers, torch's
    threads, determinism flag and random state, Python's random state, the
    environment, the current directory, warning filters and logging handlers.
    """
    import torch  # imported anyway by nearly every command; its defaults must be known before one runs

    cli_module = importlib.import_module("imgcls.cli")
    cli_state = copy.deepcopy(getattr(cli_module, "_state", None))
    interrupts = importlib.import_module("imgcls.interrupts")
    pressed = list(interrupts._pressed)
    handlers = {sig: signal.getsignal(sig) for sig in _SIGNALS}
    threads = torch.get_num_threads()
    deterministic = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    grad, dtype = torch.is_grad_enabled(), torch.get_default_dtype()
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    environ, cwd = dict(os.environ), os.getcwd()
    root = logging.getLogger()
    log_handlers, log_level = root.handlers[:], root.level
    root.handlers = []  # no handler: Python's last-resort handler prints warnings to stderr, as in a process
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(_DEFAULT_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _show_warning
            yield
    finally:
        root.handlers, root.level = log_handlers, log_level
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        random.setstate(python_rng)
        torch.set_rng_state(torch_rng)
        torch.set_default_dtype(dtype)
        torch.set_grad_enabled(grad)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        torch.set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        interrupts._pressed[:] = pressed
        if cli_state is not None:
            cli_module._state.clear()
            cli_module._state.update(cli_state)


_SIGNALS = [
    s
    for s in (
        signal.SIGINT,
        signal.SIGTERM,
        getattr(signal, "SIGHUP", None),
        getattr(signal, "SIGQUIT", None),
    )
    if s is not None
]


@contextlib.contextmanager
def _fd_output():
    """Capture what C code (onnxruntime, libtorch) writes to fds 1 and 2."""
    saved, files = [], []
    sys.stdout.flush()
    sys.stderr.flush()
    for fd in (1, 2):
        f = tempfile.TemporaryFile()
        saved.append(os.dup(fd))
        os.dup2(f.fileno(), fd)
        files.append(f)
    captured = {}
    try:
        yield captured
    finally:
        for fd, old, f in zip((1, 2), saved, files, strict=True):
            os.dup2(old, fd)
            os.close(old)
            f.seek(0)
            captured[fd] = f.read().decode("utf-8", "replace")
            f.close()


def invoke_cli(
    *args: str, input: str | None = None, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the command in this process (Typer's CliRunner), answering as `run_cli` does.

    Same result: .returncode, .stdout, .stderr (kept apart). An exception that
    escapes the command is printed to stderr as a traceback with exit code 1,
    as the interpreter does; whatever C code writes to the real fds is appended.
    """
    from typer.testing import CliRunner

    from imgcls.cli import app

    with _process_like_globals(), _fd_output() as fds:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(app, list(args), input=input, env=env, prog_name="imgcls")
    stdout, stderr, code = result.stdout + fds[1], result.stderr, result.exit_code
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
        code = 1
    return subprocess.CompletedProcess(["imgcls", *args], code, stdout, stderr + fds[2])


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory) -> tuple[Path, dict]:
    """recipes/quickstart.yaml as shipped, trained once per session by `imgcls train --json`.

    The run folder and the command's JSON result. Slow (20 epochs): a test
    using it is `@pytest.mark.slow`; share it rather than training again.
    """
    out = tmp_path_factory.mktemp("quickstart") / "run"
    result = invoke_cli("train", str(RECIPES / "quickstart.yaml"), "--out", str(out), "--json", "-q")
    assert result.returncode == 0, result.stderr
    return out, json.loads(result.stdout)


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """How many files each call of the decoded cache's decode_into decoded."""
    from imgcls.data import cache

    calls: list[int] = []
    real = cache.decode_into

    def counting(out, paths, *args, **kwargs):
        calls.append(len(paths))
        return real(out, paths, *args, **kwargs)

    monkeypatch.setattr(cache, "decode_into", counting)
    return calls


@pytest.fixture
def cli():
    """The command in-process; `run_cli` where a real process is the point."""
    return invoke_cli
