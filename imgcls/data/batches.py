"""Where training batches come from: the decoded uint8 split, placed once for the device.

:func:`open_batches` picks one of three sources for a split; each answers
``source.batch(indices) -> (x_uint8, y)`` with both tensors on the training
device, and all three give the same bytes for the same indices:

- ``device``: the whole uint8 split lives on the device and a batch is one
  index on it (no host work per step). On CUDA this is chosen when the split
  takes at most :data:`DEVICE_SHARE` (50%) of the device's free memory, the
  other half left to the model, activations and the allocator. On the CPU
  the "device" is host memory: a batch is a gather from the RAM tensor (or
  from the memory-mapped cache, when it fits the memory this process may use).
- ``host``: the split stays in host memory; a batch is gathered into one of
  two pinned buffers and copied with ``non_blocking=True``, so the copy
  overlaps the previous step (CUDA splits that do not fit on the device).
- ``stream``: a memory-mapped cache file larger than the memory this process
  may use (``disk`` cache of a large folder) is read with ``pread`` in
  chunks of :data:`CHUNK_ROWS` consecutive rows into a fixed pool of chunk
  slots (at most ``budget`` bytes, least recently used slot reused), so memory
  stays bounded whatever the split's size. Reads are sequential within a chunk;
  :func:`epoch_order` makes an epoch visit the data window by window so each
  chunk is read about once per epoch.

Which indices make a batch is the caller's business (imgcls.training.loop; sharding
across processes happens there): a source only fetches them.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEVICE_SHARE = 0.5  # of the device's free memory a split may take to live there
HOST_SHARE = 0.5  # of the memory this process may use, before a mapped split is streamed
CHUNK_ROWS = 64  # rows read by one sequential pread (64 x 150 KB = 9.6 MB at 224 px)
WINDOW_BYTES = 512 * 1024**2  # an epoch's order mixes rows within windows this large
MODES = ("auto", "device", "host", "stream")
Log = Callable[[str], None]


# --------------------------------------------------------------------------- epoch order


def epoch_order(n: int, row_bytes: int, generator: torch.Generator) -> torch.Tensor:
    """The order an epoch visits ``n`` rows of ``row_bytes`` each.

    A split of at most :data:`WINDOW_BYTES` gets a plain ``randperm`` (every
    in-memory dataset of the built-in recipes). A larger one gets a
    window-shuffled order: the chunks of :data:`CHUNK_ROWS` rows are
    permuted, cut into windows of ``WINDOW_BYTES``, and rows are permuted
    within each window. The order depends only on (n, row_bytes, generator),
    never on the machine or on the source chosen, so a streamed run and an
    in-RAM run of the same recipe see the same batches, and a resumed run the
    same order as the uninterrupted one.
    """
    if n * row_bytes <= WINDOW_BYTES:
        return torch.randperm(n, generator=generator)
    n_chunks = -(-n // CHUNK_ROWS)
    chunks = torch.randperm(n_chunks, generator=generator)
    per_window = max(WINDOW_BYTES // (CHUNK_ROWS * row_bytes), 1)
    parts = []
    for start in range(0, n_chunks, per_window):
        rows = (chunks[start : start + per_window, None] * CHUNK_ROWS + torch.arange(CHUNK_ROWS)).flatten()
        rows = rows[rows < n]
        parts.append(rows[torch.randperm(len(rows), generator=generator)])
    return torch.cat(parts)


# --------------------------------------------------------------------------- memory


def process_memory_limit() -> int:
    """Bytes this process may still use: the least of available RAM, the
    cgroup's headroom (v1 or v2) and what the address-space limit
    (``prlimit --as``) leaves beyond the address space already in use."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    limits += _cgroup_headroom()
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        limits.append(soft - _address_space_used())
    return min(limits) if limits else 1 << 62


def _address_space_used() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _cgroup_headroom() -> list[int]:
    out: list[int] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2
            base = Path("/sys/fs/cgroup") / path.lstrip("/")
            limit, usage = base / "memory.max", base / "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            limit, usage = base / "memory.limit_in_bytes", base / "memory.usage_in_bytes"
        else:
            continue
        try:
            text = limit.read_text().strip()
            if text != "max" and int(text) < 1 << 60:
                out.append(int(text) - int(usage.read_text()))
        except (OSError, ValueError):
            continue
    return out


def _device_free(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return 0


# --------------------------------------------------------------------------- sources


def _gather(x: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``idx`` of ``x``, as flat rows (index_select on 2-D rows is about
    twice as fast as on 4-D uint8 images on CPU; the bytes are the same)."""
    flat = x.reshape(len(x), -1)
    if out is None:
        return flat.index_select(0, idx).view(len(idx), *x.shape[1:])
    torch.index_select(flat, 0, idx, out=out.view(len(idx), -1))
    return out


class DeviceBatches:
    """The whole split on the device; a batch is one gather there."""

    mode = "device"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device):
        self.device = device
        if device.type == "cpu" or x.device == device:
            self.x = x
        else:  # chunk by chunk: a mapped split is never materialised whole on the host
            self.x = torch.empty(x.shape, dtype=torch.uint8, device=device)
            step = max((256 * 1024**2) // max(x[0].numel(), 1), 1)
            for i in range(0, len(x), step):
                self.x[i : i + step].copy_(x[i : i + step])
        self.y = y.to(device)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.to(self.device, non_blocking=True)
        return _gather(self.x, idx), self.y[idx]


class _PinnedPair:
    """Two pinned host buffers used in turn, each reused only after its
    previous copy to the device has finished (a CUDA event), so a
    non-blocking copy never reads a buffer being refilled."""

    def __init__(self, shape: tuple[int, ...], device: torch.device):
        self.device = device
        self.pinned = device.type == "cuda"
        self.buffers = [torch.empty(shape, dtype=torch.uint8, pin_memory=self.pinned) for _ in range(2)]
        self.events: list[Any] = [None, None]  # the CUDA event of each buffer's last copy
        self.turn = 0

    def next(self, n: int) -> tuple[torch.Tensor, int]:
        k = self.turn
        self.turn ^= 1
        if self.events[k] is not None:
            self.events[k].synchronize()  # the copy of two batches ago: long finished
        return self.buffers[k][:n], k

    def send(self, buf: torch.Tensor, k: int) -> torch.Tensor:
        if not self.pinned:
            return buf.clone() if self.device.type == "cpu" else buf.to(self.device)
        out = buf.to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.events[k] = event
        return out


class HostBatches:
    """The split in host memory; batches gathered into pinned memory and copied non-blocking."""

    mode = "host"

    def __init__(self, x: torch.Tensor, y: torch.Tensor, device: torch.device, max_batch: int):
        self.x, self.device = x, device
        self.y = y.to(device)
        self.buffers = _PinnedPair((max_batch, *x.shape[1:]), device)

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buf, k = self.buffers.next(len(indices))
        _gather(self.x, indices, out=buf)
        return self.buffers.send(buf, k), self.y[indices.to(self.device, non_blocking=True)]


class StreamBatches:
    """A cache file read in chunks into a bounded pool of slots (see the module doc)."""

    mode = "stream"

    def __init__(
        self,
        file: str | os.PathLike,
        shape: tuple[int, ...],
        y: torch.Tensor,
        device: torch.device,
        max_batch: int,
        budget: int,
        offset: int = 0,
    ):
        self.fd = -1
        self.n, self.row_shape = shape[0], tuple(shape[1:])
        self.row_bytes = int(np.prod(self.row_shape))
        self.offset, self.device = offset, device
        self.y = y.to(device)
        n_chunks = -(-self.n // CHUNK_ROWS)
        chunk_bytes = CHUNK_ROWS * self.row_bytes
        slots = int(min(n_chunks, max(budget // chunk_bytes, 1)))
        self.pool = np.empty((slots * CHUNK_ROWS, *self.row_shape), dtype=np.uint8)
        self.pool_t = torch.from_numpy(self.pool)
        self.slot_of = np.full(n_chunks, -1, dtype=np.int64)  # chunk -> slot
        self.chunk_in = np.full(slots, -1, dtype=np.int64)  # slot -> chunk
        self.used = np.zeros(slots, dtype=np.int64)  # last batch that used the slot
        self.calls = 0
        self.reads = 0  # pread calls so far: one per chunk, or per row when a batch spreads too wide
        self.buffers = _PinnedPair((max_batch, *self.row_shape), device)
        self.fd = os.open(file, os.O_RDONLY)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    @property
    def pool_bytes(self) -> int:
        return self.pool.nbytes

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        if hasattr(self, "fd"):
            self.close()

    def _read(self, chunk: int, into: np.ndarray) -> None:
        start = chunk * CHUNK_ROWS
        rows = min(CHUNK_ROWS, self.n - start)
        view = into[:rows].reshape(-1).data
        pos, got = self.offset + start * self.row_bytes, 0
        while got < len(view):
            k = os.preadv(self.fd, [view[got:]], pos + got)
            if k <= 0:
                raise OSError(f"the decoded-image cache file ended early (chunk {chunk}); clear the cache")
            got += k
        self.reads += 1

    def _load(self, indices: np.ndarray) -> np.ndarray | None:
        """Make every chunk of ``indices`` resident; their pool rows."""
        self.calls += 1
        chunks = indices // CHUNK_ROWS
        needed = np.unique(chunks)
        slots = len(self.chunk_in)
        if len(needed) > slots:
            return None  # a batch spread over more chunks than the pool holds
        missing = needed[self.slot_of[needed] < 0]
        if len(missing):
            resident = self.slot_of[needed]
            busy = np.zeros(slots, dtype=bool)
            busy[resident[resident >= 0]] = True
            free = np.flatnonzero(~busy)
            victims = free[np.argsort(self.used[free], kind="stable")[: len(missing)]]
            for chunk, slot in zip(missing.tolist(), victims.tolist(), strict=True):
                old = self.chunk_in[slot]
                if old >= 0:
                    self.slot_of[old] = -1
                self._read(chunk, self.pool[slot * CHUNK_ROWS : (slot + 1) * CHUNK_ROWS])
                self.slot_of[chunk], self.chunk_in[slot] = slot, chunk
        self.used[self.slot_of[needed]] = self.calls
        return self.slot_of[chunks] * CHUNK_ROWS + indices % CHUNK_ROWS

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = indices.numpy().astype(np.int64, copy=False)
        buf, k = self.buffers.next(len(idx))
        rows = self._load(idx)
        if rows is not None:
            _gather(self.pool_t, torch.from_numpy(rows), out=buf)
        else:  # row by row, still bounded: only the batch buffer is filled
            out = buf.numpy()
            for j, i in enumerate(idx.tolist()):
                view = memoryview(out[j].reshape(-1))
                if os.preadv(self.fd, [view], self.offset + i * self.row_bytes) != self.row_bytes:
                    raise OSError("the decoded-image cache file ended early; clear the cache")
                self.reads += 1
        return self.buffers.send(buf, k), self.y[indices.to(self.device, non_blocking=True)]


BatchSource = DeviceBatches | HostBatches | StreamBatches


def open_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    device: torch.device,
    *,
    max_batch: int,
    file: str | os.PathLike | None = None,
    mode: str = "auto",
    budget: int | None = None,
) -> BatchSource:
    """The batch source for one split (see the module doc for the modes).

    ``file``: the cache file ``x`` is mapped from (rows from offset 0), which
    ``stream`` reads; ``budget``: bytes the stream's chunk pool may take
    (default :func:`stream_budget`).
    """
    if mode not in MODES:
        raise ValueError(f"batch source mode {mode!r}: expected one of {', '.join(MODES)}")
    size = x.numel()
    if mode == "auto":
        if device.type != "cpu" and size <= DEVICE_SHARE * _device_free(device):
            mode = "device"
        elif file is not None and size > HOST_SHARE * process_memory_limit():
            mode = "stream"
        else:
            mode = "device" if device.type == "cpu" else "host"
    if mode == "device":
        return DeviceBatches(x, y, device)
    if mode == "host":
        return HostBatches(x, y, device, max_batch)
    if file is None:
        raise ValueError("a streamed batch source needs the cache file the split is mapped from")
    if budget is None:
        budget = stream_budget()
    return StreamBatches(file, tuple(x.shape), y, device, max_batch, budget)


def batch_mode() -> str:
    """``IMGCLS_BATCHES`` (``auto``, ``device``, ``host``, ``stream``): force a
    source instead of choosing by memory, as ``IMGCLS_DECODE`` forces a decoder
    (e.g. to try the stream on a machine with RAM to spare)."""
    from imgcls.errors import UsageError

    mode = os.environ.get("IMGCLS_BATCHES", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise UsageError(f"IMGCLS_BATCHES={mode!r}: choose one of {', '.join(MODES)}")
    return mode


def stream_budget() -> int:
    """The stream's pool: two windows (a batch may straddle a window's end),
    at most :data:`HOST_SHARE` of the memory this process may use."""
    return int(min(2 * WINDOW_BYTES, HOST_SHARE * process_memory_limit()))


def describe(source: BatchSource) -> str:
    """One line for the log: where batches come from."""
    if isinstance(source, StreamBatches):
        return f"batches: streamed from {source.n} cached rows through a {source.pool_bytes / 1024**2:.0f} MB pool"
    if isinstance(source, HostBatches):
        return "batches: gathered on the host, pinned, copied non-blocking"
    where = "device memory" if source.device.type != "cpu" else "host memory"
    return f"batches: the whole split in {where}"
