"""Checkpoints and run folders: safetensors + JSON metadata, no pickle, atomic writes.

A checkpoint is self-describing: the resolved recipe, the class names in
index order and the preprocessing travel in the safetensors metadata, so
predict/evaluate/export need nothing else. Resume state (optimizer, epoch,
step, history) lives beside it in ``resume.pt``: only tensors and plain
values, read with ``weights_only=True``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls.errors import CheckpointError
from imgcls.io import atomic_path
from imgcls.metadata import CHECKPOINT_FORMAT as FORMAT
from imgcls.metadata import CHECKPOINT_VERSION as FORMAT_VERSION
from imgcls.metadata import check_head, parse_checkpoint_meta, unsafe_file_reason
from imgcls.models.state import check_fit, clean_state_dict, load_weights

BEST, LAST, RESUME = "best.safetensors", "last.safetensors", "resume.pt"
PREVIOUS = ".last.previous.safetensors"  # the last pair's weights while a new pair is saved


def save_checkpoint(path: Path, model, meta: dict) -> None:
    from safetensors.torch import save_file

    state = clean_state_dict(model.state_dict())
    # safetensors refuses shared storage; weights are small, copies are fine
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    header = {"imgcls": json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **meta})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def read_meta(path: Path) -> dict:
    """The checkpoint's imgcls metadata, validated (:mod:`imgcls.metadata`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if "imgcls" not in header:
        raise CheckpointError(
            f"{path}: a safetensors file without imgcls metadata (not an imgcls checkpoint)"
        )
    return parse_checkpoint_meta(header["imgcls"], str(path))


def store_calibration(paths: list[Path], calibration: dict) -> None:
    """``calibration`` (:mod:`imgcls.calibration`) into the metadata of each
    checkpoint in ``paths``; its tensors (and any other header entry) are
    copied byte for byte. Tuned multi-label thresholds move with the new
    temperature, so every decision stays what it was. All files are written
    under temporary names first, then renamed (one bad file: none changes)."""
    from safetensors.torch import load_file, save_file

    from imgcls.calibration import carry_thresholds
    from imgcls.metadata import check_calibration, temperature_of

    with contextlib.ExitStack() as renames:
        for path in paths:
            header = _header(path)
            meta = read_meta(path)
            new = {**meta, "calibration": calibration}
            if meta.get("thresholds"):
                new["thresholds"] = carry_thresholds(
                    meta["thresholds"], temperature_of(meta), temperature_of(new)
                )
            check_calibration(new, str(path))
            tmp = renames.enter_context(atomic_path(path))
            save_file(load_file(str(path)), str(tmp), metadata={**header, "imgcls": json.dumps(new)})


def _header(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in a safetensors file, read from its header only."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    model: Any  # nn.Module, eval mode, on CPU

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def preprocessing(self) -> dict:
        return self.meta["preprocessing"]

    @property
    def recipe(self):
        from imgcls.recipe import recipe_from_dict

        return recipe_from_dict(self.meta["recipe"], f"{self.path} (recipe)")

    @property
    def run_dir(self) -> Path | None:
        parent = self.path.parent
        return parent if (parent / "recipe.yaml").exists() else None


def resolve_checkpoint(target: str | os.PathLike) -> Path:
    """A .safetensors file, a run folder (its best checkpoint), or runs/<name> (latest run)."""
    path = Path(target).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        runs = numbered_runs(path)
        if runs:
            return resolve_checkpoint(runs[-1])
        raise CheckpointError(f"{path}: no {BEST} here (is it a run folder?)")
    raise CheckpointError(f"{path}: no such checkpoint or run folder")


def numbered_runs(folder: Path) -> list[Path]:
    runs = [p for p in folder.iterdir() if p.is_dir() and p.name.isdigit() and (p / BEST).exists()]
    return sorted(runs, key=lambda p: int(p.name))


def latest_run(root: Path = Path("runs")) -> Path:
    """The most recently written best checkpoint under ``root``."""
    found = sorted(root.glob(f"*/*/{BEST}"), key=lambda p: p.stat().st_mtime) if root.is_dir() else []
    if not found:
        raise CheckpointError(f"no trained model under {root}/; train one, or pass --model")
    return found[-1]


def build_from_meta(meta: dict, where: str):
    """The model described by checkpoint metadata, with fresh (unloaded) weights."""
    from imgcls.models.build import build_model
    from imgcls.recipe import recipe_from_dict

    recipe = recipe_from_dict(meta["recipe"], f"{where} (recipe)")
    # the trained weights follow: the starting ones (published, model.weights) are not read
    spec = recipe.model.model_copy(update={"pretrained": False, "weights": None})
    return build_model(spec, tuple(meta["input_shape"]), len(meta["classes"]))


def load_checkpoint(target: str | os.PathLike) -> Checkpoint:
    """Read, validate and build the checkpoint ``target`` (file, run folder, runs/<name>).

    The metadata and every tensor's shape are checked against the
    architecture (built on the meta device, which allocates nothing) before
    a byte of weights is read.
    """
    import torch
    from safetensors.torch import load_file

    path = resolve_checkpoint(target)
    meta = read_meta(path)
    where = str(path)
    shapes = tensor_shapes(path)
    try:
        with torch.device("meta"):
            skeleton = build_from_meta(meta, where)
    except (RuntimeError, NotImplementedError):
        skeleton = None  # an architecture that cannot be built on meta: checked when loaded
    if skeleton is not None:
        head = _head_weight(skeleton)
        if head is not None and shapes.get(head):
            check_head(
                meta["classes"], shapes[head][0], where, f"the head ({head}, shape {list(shapes[head])})"
            )
        try:
            check_fit(skeleton, shapes, where)
        except CheckpointError:
            _check_class_count(meta, shapes, skeleton, where)
            raise
    state = load_file(str(path))
    model = _model_with_weights(meta, state, where, skeleton)
    model.eval()
    return Checkpoint(path, meta, model)


def _check_class_count(meta: dict, shapes: dict[str, tuple[int, ...]], skeleton, where: str) -> None:
    """Weights that do not fit because ``classes`` names another number of
    classes than they were trained for: say that (the key and both counts),
    not which head tensors are missing. A layer stack whose own output is as
    wide as its class list gets no dense head, so there the mismatch shows as
    a head too many or too few. Candidates: the input width of a Linear the
    file lacks, the rows of a 2-D weight only the file has; the one a model
    built for that many classes fits exactly is the file's count."""
    import torch
    from torch import nn

    own = set(skeleton.state_dict())
    counts = {
        m.in_features
        for n, m in skeleton.named_modules()
        if isinstance(m, nn.Linear) and f"{n}.weight" not in shapes
    }
    counts |= {
        shape[0] for k, shape in shapes.items() if k not in own and k.endswith(".weight") and len(shape) == 2
    }
    for n in sorted(counts - {len(meta["classes"])}):
        try:
            with torch.device("meta"):
                other = build_from_meta({**meta, "classes": [str(i) for i in range(n)]}, where)
            check_fit(other, shapes, where)
        except Exception:  # not this count
            continue
        check_head(meta["classes"], n, where, "the model in the file")


def _head_weight(model) -> str | None:
    """State-dict key of the weight of the last Linear / Conv layer (the class scores)."""
    from torch import nn

    last = None
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name:
            last = f"{name}.weight"
    return last


def _model_with_weights(meta: dict, state: dict, where: str, skeleton=None):
    """Build the model without initialising weights we are about to overwrite.

    The model built on the meta device (``skeleton``) gets the checkpoint's
    tensors assigned in (seconds saved for googlenet-sized nets); an
    architecture that cannot be built on meta, or keeps tensors outside its
    state dict, is built the ordinary way.
    """
    if skeleton is not None:
        load_weights(skeleton, state, assign=True, where=where)
        tensors = [*skeleton.parameters(), *skeleton.buffers()]
        if not any(t.is_meta for t in tensors):
            return skeleton
    model = build_from_meta(meta, where)
    load_weights(model, state, where=where)
    return model


# --------------------------------------------------------------------------- run folders


def new_run_dir(root: Path, name: str, prefix: str = "") -> Path:
    """``root/name/<prefix><n>`` with n one more than the highest; created atomically."""
    from imgcls.errors import UsageError

    base = root / name
    try:
        base.mkdir(parents=True, exist_ok=True)
        while True:
            taken = [int(p.name[len(prefix) :]) for p in base.iterdir() if _numbered(p.name, prefix)]
            run = base / f"{prefix}{max(taken, default=0) + 1}"
            try:
                run.mkdir()
                return run
            except FileExistsError:
                continue
    except OSError as exc:
        raise UsageError(
            f"{base}: cannot create the run folder here ({exc.strerror or exc}); set train.out"
        ) from None


# a run folder being written is held (flock on the folder itself: nothing is written,
# and the kernel lets go when the process ends, killed or not) by the process writing
# it: train (and resume), calibrate, cv's parent. A second writer is refused in one
# line instead of interleaving checkpoints, or rolling back the other's save in
# repair_pair. The descriptors this process holds them by, innermost last.
_HELD: list[int] = []


def hold_run(path: Path, advice: str) -> None:
    """Hold run folder ``path`` until the enclosing :func:`holding_runs` ends, or
    refuse in one line (ending with ``advice``) when another process holds it.
    Where the file system cannot lock (some network ones, Windows), nothing is
    held and nothing refused."""
    from imgcls.errors import UsageError

    try:
        import fcntl
    except ImportError:  # Windows: no flock
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not there (yet): what runs next says so in its own words
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise UsageError(
                f"{path}: another imgcls process is writing this run folder (training, resuming, "
                f"calibrating or cross-validating it); {advice}"
            ) from None
        return  # a file system without locks
    _HELD.append(fd)


@contextlib.contextmanager
def holding_runs():
    """Every folder :func:`hold_run` holds inside the block is let go when it ends
    (however it ends): closing the descriptor releases its flock."""
    before = len(_HELD)
    try:
        yield
    finally:
        while len(_HELD) > before:
            os.close(_HELD.pop())


def _numbered(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and name[len(prefix) :].isdigit()


def check_out_dir(path: Path, *, empty: bool = True) -> None:
    """Refuse an --out folder we could not use, before minutes of decoding.

    It must be new or (with ``empty``) an empty folder, inside an existing,
    writable folder: a missing parent is an error (a typo should not scatter
    folders about)."""
    from imgcls.errors import UsageError

    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{path}: exists and is not a folder")
        if empty and any(path.iterdir()):
            raise UsageError(f"{path}: already holds files; choose a new --out (nothing is overwritten)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"{path}: this folder is not writable")
        return
    _check_parent(path)


def check_out_file(path: Path) -> None:
    """Refuse an output file (--out) we could not write, before the work.

    Written by :func:`atomic_path`: a temporary file beside it, renamed over
    it, so its folder must exist and be writable even when the file exists;
    a missing folder is an error, as for :func:`check_out_dir`."""
    from imgcls.errors import UsageError

    if path.is_dir():
        raise UsageError(f"{path}: is a folder; give a file name")
    _check_parent(path, "write" if path.exists() else "create")


def _check_parent(path: Path, verb: str = "create") -> None:
    from imgcls.errors import UsageError

    parent = path.absolute().parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UsageError(f"{path}: the parent folder {parent} {what}; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{path}: cannot {verb} it, {parent} is not writable")


def claim_out_dir(path: Path) -> bool:
    """An explicit --out folder: created, or empty; never overwritten.
    True when this call created it (so a failed start may remove it)."""
    from imgcls.errors import UsageError

    check_out_dir(path)
    try:
        path.mkdir()
        return True
    except FileExistsError:
        check_out_dir(path)  # appeared meanwhile: still only if empty
        return False
    except OSError as exc:
        raise UsageError(f"{path}: cannot create it ({exc.strerror or exc})") from None


def remove_unstarted_run(path: Path, created: bool, written: list[str]) -> None:
    """Undo a run folder that never got a checkpoint: the files this run wrote,
    and the folder itself when this run created it (a user's empty --out stays)."""
    for name in written:
        (path / name).unlink(missing_ok=True)
    if created:
        try:
            path.rmdir()  # only if empty: never anything we did not write
        except OSError:
            pass


def save_resume(path: Path, state: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def save_pair(run_dir: Path, model, meta: dict, resume: dict) -> None:
    """last.safetensors and resume.pt as one commit: both carry the save's
    ``generation`` (``meta`` and ``resume["state"]``), and the previous weights
    stay (a hard link, no copy) until resume.pt follows them. A save cut off
    between the two renames (a kill, a second Ctrl-C) leaves a pair that
    :func:`check_pair` falls back to."""
    last, previous = run_dir / LAST, run_dir / PREVIOUS
    previous.unlink(missing_ok=True)
    if last.exists():
        with contextlib.suppress(OSError):  # a file system without hard links: no fallback
            os.link(last, previous)
    save_checkpoint(last, model, meta)
    save_resume(run_dir / RESUME, resume)
    previous.unlink(missing_ok=True)


def repair_pair(run_dir: Path, log) -> None:
    """Before a resume, in one process (rank 0, before the others read): a save
    cut off between last.safetensors and resume.pt falls back to the pair before
    it, or refuses (:func:`check_pair`). resume.pt's tensors are mapped, not read."""
    import torch

    if not (run_dir / LAST).is_file() or not (run_dir / RESUME).is_file():
        return  # the resume's own checks name what is missing
    try:
        saved = torch.load(run_dir / RESUME, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return  # unreadable: load_resume says so in its own words
    check_pair(run_dir, saved.get("state", {}).get("generation"), log)


def check_pair(run_dir: Path, generation: int | None, log=None) -> None:
    """last.safetensors must be the weights saved with resume.pt's ``generation``.
    With ``log`` (one process, before the others read: rank 0), a save cut off
    between the two files is undone: the previous weights, kept for that, go
    back as last.safetensors, and that is said. Otherwise: one line naming both files."""
    last, previous = run_dir / LAST, run_dir / PREVIOUS
    have = read_meta(last).get("generation")
    if have == generation:
        if log is not None:
            previous.unlink(missing_ok=True)
        return
    if log is not None and previous.is_file() and read_meta(previous).get("generation") == generation:
        os.replace(previous, last)
        log(
            f"{last}: a save was cut off before {RESUME} followed it; "
            f"resuming from the pair saved before (generation {generation})"
        )
        return
    raise CheckpointError(
        f"{last} (generation {have}) and {run_dir / RESUME} (generation {generation}) are from different "
        "saves (one was cut off between the two); resume refuses to mix their weights and optimizer state"
    )


def load_resume(path: Path) -> dict:
    import torch

    if not path.exists():
        raise CheckpointError(f"{path.parent}: no {RESUME}; this run cannot be resumed")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = unsafe_file_reason(exc) or f"unreadable resume state ({str(exc).strip().splitlines()[0]})"
        raise CheckpointError(f"{path}: {reason}") from None
