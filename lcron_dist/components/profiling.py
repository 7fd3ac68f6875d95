"""Profiling hooks of the trainer: phase timers, peak memory, torch.profiler traces, memory snapshots, FLOP counts.

Every step phase runs under a `record_function` label (PHASES), so a Chrome trace reads as the
pipeline; the same labels time the phases for the per-log-step shares in metrics.jsonl. The optional
profilers are context managers that do nothing when off.
"""

from __future__ import annotations

import contextlib
import math
import resource
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule

PHASES = ("data", "input_dist", "forward", "backward", "dense_step", "sparse_step")
"""Timed phases of a training step, in pipeline order (record_function ranges 'lcron/<phase>';
'input_dist' is the train pipeline's distribution of the next batch's ids, absent without it). Traces
also show the forward's parts, 'lcron/embedding' (input distribution + lookup), 'lcron/towers' and
'lcron/loss', and evaluation as 'lcron/eval'."""


class PhaseTimer:
    """Wall time per phase since the last reset; each phase is also a record_function range.

    On CUDA, timing waits for the device at phase boundaries only while `sync` is set (the trainer
    sets it for the steps it logs), so unlogged steps keep their asynchrony.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sync = False
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        with record_function(f"lcron/{name}"):
            if self.sync and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            start = time.perf_counter()
            yield
            if self.sync and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] += time.perf_counter() - start

    def shares(self) -> dict[str, float]:
        """Each phase's share of the timed total since the last reset, then reset."""
        total = sum(self.seconds.values()) or 1.0
        out = {f"share/{name}": self.seconds.get(name, 0.0) / total for name in PHASES if name in self.seconds}
        self.seconds.clear()
        return out


def peak_memory_mib(device: torch.device) -> dict[str, float]:
    """Peak memory of this process: RSS on CPU; allocated and reserved on CUDA."""
    if device.type == "cuda":
        return {"peak_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
                "peak_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _onednn_linear_flops(x_shape, w_shape, *args, **kwargs) -> int:  # noqa: ARG001
    """FLOPs of oneDNN's linear, from its operands' shapes: [.., K] x [N, K]ᵀ."""
    return 2 * math.prod(x_shape) * w_shape[0]


def flop_counter() -> "FlopCounterMode":
    """torch's FlopCounterMode (mm, bmm, addmm, convolutions, ...) that also counts oneDNN's linear, which
    the towers' linear layers call on CPU (models.layers.OneDNNLinear) and torch's table does not know."""
    from torch.utils.flop_counter import FlopCounterMode

    from lcron_dist.models.layers import ONEDNN_LINEAR

    mapping = {ONEDNN_LINEAR._overloadpacket: _onednn_linear_flops} if ONEDNN_LINEAR is not None else {}
    return FlopCounterMode(display=False, custom_mapping=mapping)


@contextlib.contextmanager
def maybe_enable_profiling(enabled: bool, trace_dir: Path, rank: int, start_step: int, active_steps: int,
                           device: torch.device) -> Iterator[profile | None]:
    """torch.profiler over steps [start_step, start_step + active_steps), a Chrome trace per rank.

    Yields the profiler (call .step() after every training step) or None when off.
    """
    if not enabled:
        yield None
        return
    trace_dir.mkdir(parents=True, exist_ok=True)

    def export(prof: profile) -> None:
        prof.export_chrome_trace(str(trace_dir / f"rank{rank}-step{prof.step_num}.json"))

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    warmup = 1 if start_step >= 2 else 0  # steps 1.. wait, one warm-up step, then the active window
    with profile(activities=activities, schedule=schedule(wait=max(start_step - 1 - warmup, 0), warmup=warmup,
                                                          active=active_steps, repeat=1),
                 on_trace_ready=export, record_shapes=False, profile_memory=True) as prof:
        yield prof


@contextlib.contextmanager
def maybe_enable_memory_snapshot(enabled: bool, snapshot_dir: Path, rank: int, device: torch.device) -> Iterator[None]:
    """CUDA memory history for the run, dumped at the end and on an out-of-memory error.

    On CPU there is no allocator history; peak RSS per rank is logged instead (peak_memory_mib).
    """
    if not enabled or device.type != "cuda":
        yield
        return
    snapshot_dir.mkdir(parents=True, exist_ok=True)
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.memory._dump_snapshot(str(snapshot_dir / f"rank{rank}-oom.pickle"))
        raise
    finally:
        torch.cuda.memory._dump_snapshot(str(snapshot_dir / f"rank{rank}.pickle"))
        torch.cuda.memory._record_memory_history(enabled=None)
