"""torch.distributed glue: ranks, sharding, barriers, rank-0 writes.

Scaling out is PyTorch's own engine: processes are started by its elastic
launcher (``torchrun``, or :func:`launch` behind ``imgcls train --nproc N``,
which calls the same ``elastic_launch``), gradients are averaged by
DistributedDataParallel. Nothing here starts processes by itself or talks
over sockets of its own.

The rules every rank follows:

* The global batch of step ``s`` is ``perm[s*B:(s+1)*B]``, as in one process;
  rank ``r`` of ``W`` takes its contiguous ``B/W`` slice (:meth:`Group.shard`).
* Rank 0 decodes the data (and fills the persistent cache) while the others
  wait at a barrier, then they read the same cache.
* Rank 0 alone writes the run folder: checkpoints, metrics, plots, report.
* Validation rows are split between ranks and the sums all-reduced.
* A restarted group (``TORCHELASTIC_RESTART_COUNT > 0``) resumes the run folder
  rank 0 recorded for its ``TORCHELASTIC_RUN_ID``.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgcls.errors import EXIT_FAILURE, EXIT_INTERRUPTED, ImgclsError, RecipeError, UsageError

# how long a rank waits for the others (rendezvous, the data barrier, a
# collective) before failing with one line instead of hanging; rank 0 may
# decode a large data set meanwhile, hence the generous default
TIMEOUT_ENV = "IMGCLS_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800
# fault injection for testing elastic restarts: "RANK:STEP" makes that rank
# SIGKILL itself before global optimizer step STEP, in the first attempt only
KILL_ENV = "IMGCLS_KILL_AT"
RECORDS = ".torchelastic"  # runs/<name>/.torchelastic/<run id>: the run folder of a group


def _timeout_s() -> float:
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise UsageError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds") from None


@dataclass(frozen=True)
class Group:
    """This process's place in the group; one process is a group of one."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    control: Any = None  # a gloo group for host-side flags (the default one when on CPU)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier(group=self.control)

    def broadcast(self, value):
        """Rank 0's ``value`` on every rank (a small picklable object)."""
        if not self.active:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any: all ranks stop at the same
        step. A host-side gloo all-reduce of one integer: no device sync."""
        if not self.active:
            return flag
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def sum(self, tensor):
        """In-place sum over ranks (on the tensor's device); returns it."""
        if self.active:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def sum_host(self, values: list[float]) -> list[float]:
        """Plain numbers summed over ranks (float64, on the host)."""
        if not self.active:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.control)
        return t.tolist()

    def shard(self, rows):
        """This rank's contiguous slice of a global batch (its length divides)."""
        if not self.active:
            return rows
        size = len(rows) // self.world
        return rows[self.rank * size : (self.rank + 1) * size]

    def split(self, n: int) -> range:
        """This rank's contiguous share of ``n`` rows (validation: the first
        ``n % W`` ranks take one row more; every row is counted once)."""
        if not self.active:
            return range(n)
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            with contextlib.suppress(Exception):
                dist.destroy_process_group()


SINGLE = Group()


def launched() -> bool:
    """Started by torchrun / the elastic launcher (with more than one process)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def join(device_name: str) -> Group:
    """Join the process group torchrun set up in the environment (nccl on CUDA,
    gloo otherwise); one process without it. Each rank gets the GPU LOCAL_RANK."""
    if not launched():
        return SINGLE
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda:
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UsageError(
                f"local rank {local_rank} has no GPU: this machine has {count}; "
                "start at most one process per GPU"
            )
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=_timeout_s())
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                "nccl" if cuda else "gloo",
                timeout=timeout,
                store=_attempt_store(world, timeout),
                rank=rank,
                world_size=world,
                **({"device_id": torch.device("cuda", local_rank)} if cuda else {}),  # type: ignore[arg-type]  # torch's stub types **kwargs by the other arguments
            )
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ImgclsError(
                f"rank {rank} could not join the group at {where} (timeout {timeout.seconds}s): {first}; "
                "check --rdzv-endpoint / MASTER_ADDR and that every node started"
            ) from None
    control = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    return Group(rank=rank, world=world, local_rank=local_rank, control=control)


def _attempt_store(world: int, timeout: datetime.timedelta):
    """Under the elastic agent, the agent's store with a key prefix of its own
    per restart attempt: a restarted group must not read the addresses the dead
    attempt published (gloo then connects to a process that is gone: seen as
    'Connection refused' on the first restart). None: torch's env:// store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"imgcls/attempt_{_restart_count()}/", store)


def this_rank() -> int:
    """This process's rank in a group torchrun (or ``--nproc``) started; 0 alone."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


def rank_failure(rank: int, exc: BaseException) -> BaseException | int:
    """What a rank does with an error that ends its training.

    Rank 0 reports it (``exc`` itself comes back: raise it). The others say
    nothing for Ctrl-C and bad input, which rank 0 says once for the group
    (every rank reads the same recipe): their exit code comes back. Any other
    failure comes back as an error naming the rank."""
    if rank == 0:
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    from imgcls.errors import Interrupted

    code = getattr(exc, "exit_code", EXIT_FAILURE)
    if isinstance(exc, Interrupted) or code == 2:
        return code
    error = ImgclsError(f"rank {rank}: {exc}")
    error.exit_code = code
    return error


def broken_group(group: Group, exc: BaseException) -> ImgclsError | None:
    """A collective that failed because another process died or hung, as one line."""
    text = str(exc)
    if not group.active or not any(w in text for w in ("gloo", "Gloo", "NCCL", "Connection", "timed out")):
        return None
    first = text.strip().splitlines()[0]
    if "]" in first:  # "[/path/to/pair.cc:545] Read error ..."
        first = first.split("]", 1)[1].strip()
    return ImgclsError(
        f"rank {group.rank}: the process group broke (another process died or hung): {first[:160]}"
    )


def per_rank_batch(batch_size: int, world: int) -> int:
    if batch_size % world:
        raise RecipeError(
            f"train.batch_size {batch_size} does not divide among {world} processes "
            f"(the batch is global; each process takes batch_size / {world})"
        )
    return batch_size // world


def check_launch(nproc: int, recipe) -> None:
    """What can be refused before any process starts."""
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: give 1 or more processes")
    per_rank_batch(recipe.train.batch_size, nproc)
    if recipe.train.device == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > count:
            raise UsageError(
                f"--nproc {nproc} with device cuda needs {nproc} GPUs; this machine has {count} "
                "(one process per GPU)"
            )
    if recipe.train.sync_batchnorm and recipe.train.device != "cuda":
        import torch

        if recipe.train.device == "cpu" or not torch.cuda.is_available():
            raise RecipeError(
                "train.sync_batchnorm needs CUDA GPUs (torch's SyncBatchNorm has no CPU kernel)"
            )


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask, where the OS keeps one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def oversubscribed(nproc: int, recipe) -> str | None:
    """A warning when CPU processes outnumber the cores: each then waits for the
    others at every step, so the run is slower than with fewer (None: fine, or GPUs)."""
    device = recipe.train.device
    if device == "cuda" or device == "auto":
        import torch

        if device == "cuda" or torch.cuda.is_available():
            return None
    cpus = usable_cpus()
    if nproc <= cpus:
        return None
    return (
        f"warning: --nproc {nproc} is more than the {cpus} CPU cores this machine gives the run; "
        f"the processes will take turns (use --nproc {cpus} or fewer)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            raise UsageError(
                f"--port {port}: already in use ({exc.strerror or exc}); choose another or leave it out"
            ) from None


def launch(worker_args: list[str], nproc: int, *, max_restarts: int = 0, port: int | None = None) -> int:
    """Start ``nproc`` local workers running ``python -m imgcls <worker_args>``
    through torch's elastic launcher (torchrun's code path); their exit code.

    Ctrl-C here reaches the workers as SIGINT (the launcher forwards it): they
    stop at the same step, rank 0 saves once, and this returns 130."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if port is None:
        port = free_port()
    else:
        check_port(port)
    # the launcher's own logs repeat what the workers already said, in many lines
    # (torch gives each of its modules' loggers its own level, so each is quieted)
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:  # N processes share the cores, as torchrun does
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{port}",
        rdzv_configs={"timeout": int(min(_timeout_s(), 300)), "join_timeout": int(min(_timeout_s(), 300))},
        max_restarts=max_restarts,
        monitor_interval=0.1,
        start_method="spawn",
    )
    try:
        elastic_launch(config, sys.executable)(*["-m", "imgcls", *worker_args])
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()  # the first to fail: the cause, not the ones stopped after
        code = failure.exitcode
        if code < 0:  # killed by a signal: nobody printed anything
            if -code == signal.SIGINT:
                return EXIT_INTERRUPTED
            name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            restarts = (
                f" after {max_restarts} restarts"
                if max_restarts
                else " (--max-restarts K restarts the group)"
            )
            raise ImgclsError(f"rank {rank} was killed by {name} (out of memory?){restarts}") from None
        return code or EXIT_FAILURE
    except SignalException:
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImgclsError(f"the launcher failed: {first}") from None
    return 0


# --------------------------------------------------------------------------- elastic restarts


def _restart_count() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def _record_path(recipe) -> Path | None:
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if not run_id:
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in run_id)
    return Path(recipe.train.out) / recipe.name / RECORDS / safe


def restart_target(group: Group, recipe, out: Path | None, resume: Path | None, log) -> tuple:
    """(out, resume) for this attempt. A restarted group resumes the run folder
    of its first attempt (the one given, or the one recorded for the run id)
    when a checkpoint is there; a folder killed before its first checkpoint
    is emptied of what the start wrote and used again."""
    from imgcls import checkpoint as ck

    if _restart_count() == 0:
        return out, resume
    if group.main:
        target = resume or out
        record = _record_path(recipe)
        if target is None and record is not None and record.is_file():
            target = Path(json.loads(record.read_text())["run_dir"])
        if target is not None and (target / ck.LAST).is_file():
            out, resume = None, target
            log(f"restart {_restart_count()}: resuming {target} from its last checkpoint")
        elif target is not None and target.is_dir() and resume is None:
            ck.remove_unstarted_run(target, False, ["recipe.yaml", "summary.txt", "summary.json", "run.json"])
            out = target
            log(f"restart {_restart_count()}: starting {target} again (no checkpoint yet)")
    return group.broadcast((out, resume))


def record_run_dir(recipe, run_dir: Path) -> None:
    """Rank 0 notes the group's run folder, so a restarted group finds it."""
    from imgcls.io import write_text_atomic

    record = _record_path(recipe)
    if record is None:
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(record, json.dumps({"run_dir": str(run_dir.absolute())}))


def forget_run_dir(recipe) -> None:
    record = _record_path(recipe)
    if record is not None:
        record.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            record.parent.rmdir()


def maybe_die(group: Group, global_step: int) -> None:
    """Fault injection (IMGCLS_KILL_AT=RANK:STEP), first attempt only."""
    spec = os.environ.get(KILL_ENV)
    if not spec or _restart_count() > 0:
        return
    rank, step = (int(v) for v in spec.split(":"))
    if rank == group.rank and step == global_step:
        os.kill(os.getpid(), signal.SIGKILL)
