"""``precision: auto``: the training dtype chosen per model, by timing it.

Whether bf16 autocast pays depends on the model, not only on the device: on a
2-core AVX512-BF16 EPYC it was 1.26x faster than fp32 on the quickstart and
1.35x on a resnet-style net, but 0.85x on a mobilenet-style one (depthwise
convolutions have no fast bf16 kernel). So ``auto`` times a few training steps
(forward, backward, SGD step) of a copy of the model at the run's batch size,
input size and memory format, for each candidate:

- CPU with native bf16 (``avx512_bf16`` or ``amx_bf16`` in the CPU flags):
  fp32 and bf16; any other CPU, MPS: fp32, nothing timed.
- CUDA: bf16 (when the GPU supports it) and fp16.

Candidates are timed in turns (the best of :data:`ROUNDS` rounds counts,
robust to a shared machine), and a reduced precision must beat fp32 by
:data:`MARGIN` to be chosen (a lower precision is not worth noise).

A run of fewer than :data:`MIN_RUN_STEPS` optimizer steps is not timed (the
probe's 16 steps would cost more than they could save): it takes the fixed
choice below. With ``deterministic: true`` nothing is measured (a timing cannot decide a
bit-identical run): the fixed choice is fp32 on CPU and MPS, bf16 on CUDA
(fp16 where the GPU has no bf16). A resumed ``auto`` run keeps the precision
recorded in its run.json, so it continues in the dtype it started with.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imgcls.errors import UsageError

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
DTYPES = {name: dtype for dtype, name in NAMES.items()}
MARGIN = 1.05  # a reduced precision must be this much faster than fp32 to be chosen
WARMUP = 2  # untimed steps per candidate (kernel selection, allocator)
ROUNDS = 3  # timed rounds, candidates in turn; each round times STEPS steps
STEPS = 2
MIN_RUN_STEPS = 200  # shorter runs are not timed (16 probe steps would be > 8% of the run)
Log = Callable[[str], None]


@dataclass
class PrecisionChoice:
    dtype: torch.dtype
    how: str  # "asked", "measured", "fixed (deterministic)", "only candidate", "kept from the run"
    img_per_s: dict[str, float] = field(default_factory=dict)  # measured candidates
    seconds: float = 0.0  # time the measurement took

    @property
    def name(self) -> str:
        return NAMES[self.dtype]

    @property
    def ratio(self) -> float | None:
        """The chosen precision's speed over fp32's (None when not measured)."""
        base = self.img_per_s.get("fp32")
        mine = self.img_per_s.get(self.name)
        return round(mine / base, 3) if base and mine else None

    def info(self) -> dict:
        """What run.json records."""
        out: dict[str, Any] = {"how": self.how}
        if self.img_per_s:
            out["img_per_s"] = {k: round(v, 1) for k, v in self.img_per_s.items()}
            out["seconds"] = round(self.seconds, 2)
        if self.ratio is not None:
            out["ratio_vs_fp32"] = self.ratio
        return out

    def line(self) -> str:
        """One line for the log."""
        if not self.img_per_s:
            return f"precision: {self.name} ({self.how})"
        timed = ", ".join(f"{k} {v:.0f} img/s" for k, v in self.img_per_s.items())
        ratio = f", {self.ratio:.2f}x fp32" if self.ratio is not None else ""
        return f"precision: {self.name} (measured: {timed}{ratio}; {self.seconds:.1f} s)"


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (x86 AVX512-BF16 or AMX; Linux flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def candidates(device: torch.device) -> list[torch.dtype]:
    if device.type == "cuda":
        return [torch.bfloat16, torch.float16] if torch.cuda.is_bf16_supported() else [torch.float16]
    if device.type == "cpu" and cpu_has_bf16():
        return [torch.float32, torch.bfloat16]
    return [torch.float32]


def fixed_choice(device: torch.device) -> torch.dtype:
    """``auto`` with ``deterministic: true``: fp32, except bf16 (else fp16) on CUDA."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def asked(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("precision fp16 needs a CUDA device (use bf16 or fp32 on CPU)")
    return DTYPES[precision]


def choose(
    precision: str,
    device: torch.device,
    *,
    model: nn.Module,
    input_shape: tuple[int, ...],
    num_classes: int,
    batch_size: int,
    channels_last: bool,
    deterministic: bool,
    run_steps: int | None = None,
    resumed_from: Path | None = None,
    log: Log = lambda message: None,
) -> PrecisionChoice:
    """The training dtype for ``precision`` (see the module doc). ``model`` is
    not changed: the timing runs on a copy, with the global RNG restored."""
    if precision != "auto":
        return PrecisionChoice(asked(precision, device), "asked")
    if deterministic:
        return PrecisionChoice(fixed_choice(device), "fixed (deterministic)")
    kept = _kept(resumed_from)
    if kept is not None:
        return PrecisionChoice(kept, "kept from the run")
    options = candidates(device)
    if len(options) == 1:
        return PrecisionChoice(options[0], "only candidate")
    if run_steps is not None and run_steps < MIN_RUN_STEPS:
        return PrecisionChoice(fixed_choice(device), f"fixed: a run under {MIN_RUN_STEPS} steps is not timed")
    start = time.perf_counter()
    speed = time_candidates(model, options, device, input_shape, num_classes, batch_size, channels_last)
    seconds = time.perf_counter() - start
    best = max(options, key=lambda d: speed[NAMES[d]] * (1.0 if d == torch.float32 else 1 / MARGIN))
    return PrecisionChoice(best, "measured", {NAMES[d]: speed[NAMES[d]] for d in options}, seconds)


def _kept(run_dir: Path | None) -> torch.dtype | None:
    if run_dir is None:
        return None
    import json

    try:
        name = json.loads((run_dir / "run.json").read_text()).get("precision")
    except (OSError, ValueError, AttributeError):
        return None
    return DTYPES.get(name) if isinstance(name, str) else None


def time_candidates(
    model: nn.Module,
    dtypes: list[torch.dtype],
    device: torch.device,
    input_shape: tuple[int, ...],
    num_classes: int,
    batch_size: int,
    channels_last: bool,
) -> dict[str, float]:
    """Training images per second of ``model`` under each dtype's autocast
    (the best of :data:`ROUNDS` rounds, candidates in turn)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((batch_size, *input_shape), generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch_size,), generator=gen).to(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(model).train()
        optimizer = torch.optim.SGD(probe.parameters(), lr=1e-6)
        scalers = {d: torch.amp.GradScaler(device.type, enabled=d == torch.float16) for d in dtypes}

        def steps(dtype: torch.dtype, count: int) -> float:
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(count):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                    out = probe(x)
                    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
                    loss = F.cross_entropy(out.float(), y)
                optimizer.zero_grad(set_to_none=True)
                scalers[dtype].scale(loss).backward()
                scalers[dtype].step(optimizer)
                scalers[dtype].update()
            _sync(device)
            return time.perf_counter() - t0

        for d in dtypes:
            steps(d, WARMUP)
        best = {NAMES[d]: float("inf") for d in dtypes}
        for _ in range(ROUNDS):
            for d in dtypes:
                best[NAMES[d]] = min(best[NAMES[d]], steps(d, STEPS))
    return {k: STEPS * batch_size / max(v, 1e-9) for k, v in best.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
