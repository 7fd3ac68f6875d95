"""Where a training step's time goes: per-phase time (mean, p50, p95), requests/s, and the same for evaluation;
then a roofline figure and the top operators.

Runs the real Trainer for N steps (after warm-up steps, so torch.compile is done) with phase timing
synchronised on every step, then evaluation batches of the test day. Works as one process or under
torchrun (rank 0 reports its own timings, with requests/s for all ranks).

Roofline: the matrix-product FLOPs of one real training step (forward + backward, counted by
torch.utils.flop_counter.FlopCounterMode: mm, bmm, addmm, convolutions, ..., and oneDNN's linear, which
the towers' layers use on CPU; elementwise work is not counted), the machine's matrix-multiply rate
measured in the same process with the same threads (float32 4096 x 4096 products, and the step's most
common product shape; on CPU by aten, which calls MKL, and by oneDNN: on an AMD CPU MKL runs AVX2 code
where oneDNN runs AVX-512), and the share of the best of those rates the step achieves: FLOPs / step
time / rate. Then the operators that take the most time in a few steps (torch.profiler, self CPU time),
so the next push knows where to look.

    python tools/profile_throughput.py --config configs/small-2stage.toml [--steps 20] [--out DIR] [overrides]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _row(name: str, seconds: list[float], total: float) -> str:
    ms = np.array(seconds) * 1000
    return (f"| {name} | {ms.mean():.1f} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 95):.1f} | "
            f"{ms.sum() / 1000 / total:.0%} |")


def matmul_rate(m: int, k: int, n: int, device: torch.device, backend: str = "aten", seconds: float = 0.3) -> float:
    """float32 [m, k] x [k, n] matrix-multiply rate on `device` by `backend` ("aten": torch.mm, which calls
    MKL on CPU; "onednn": oneDNN's linear, as the towers' layers use it on CPU), GFLOP/s: the best of
    several timed rounds of back-to-back products, each round at least `seconds` / 3 long."""
    from lcron_dist.models.layers import ONEDNN_LINEAR

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    weight = b.T.contiguous()  # oneDNN's linear takes the [n, k] weight
    product = (lambda: ONEDNN_LINEAR(a, weight, None, "none", [], "")) if backend == "onednn" else (lambda: a @ b)
    product()
    best = 0.0
    for _ in range(3):
        sync()
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < seconds / 3:
            product()
            count += 1
            if count % 8 == 0:
                sync()
        sync()
        best = max(best, 2 * m * k * n * count / (time.perf_counter() - start) / 1e9)
    return best


def step_flops(trainer, batch) -> tuple[float, tuple[int, int, int] | None]:
    """Matrix-product FLOPs of one training step, and its most frequent product shape (m, k, n)."""
    from lcron_dist.components.profiling import flop_counter
    from lcron_dist.models.layers import ONEDNN_LINEAR

    shapes: Counter = Counter()

    def record(func, types, args=(), kwargs=None):  # noqa: ARG001
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default):
            a, b = args[-2], args[-1]
            shapes[(a.shape[0], a.shape[1], b.shape[1])] += 1
        elif func is ONEDNN_LINEAR:
            x, weight = args[0], args[1]
            shapes[(x.numel() // x.shape[-1], x.shape[-1], weight.shape[0])] += 1
        return func(*args, **(kwargs or {}))

    with flop_counter() as counter, _ShapeLog(record):
        trainer.train_step(batch)
    return counter.get_total_flops(), (shapes.most_common(1)[0][0] if shapes else None)


class _ShapeLog(TorchDispatchMode):
    """Calls `record` for every dispatched op (used to find the step's common matrix shapes)."""

    def __init__(self, record) -> None:
        super().__init__()
        self.record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self.record(func, types, args, kwargs)


def top_operators(trainer, batches: list, count: int) -> list[tuple[str, float, float]]:
    """(operator, ms per step, share of profiled self time) of the `count` slowest operators (self CPU time)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            trainer.train_step(batch)
    events = [e for e in prof.key_averages() if not e.key.startswith(("lcron/", "ProfilerStep"))]
    total = sum(e.self_cpu_time_total for e in events) or 1
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, e.self_cpu_time_total / 1000 / len(batches), e.self_cpu_time_total / total) for e in events[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-batches", type=int, default=5)
    parser.add_argument("--top", type=int, default=15, help="operators listed by time")
    parser.add_argument("--out", type=Path, default=Path("runs/profile-throughput"))
    args, overrides = parser.parse_known_args()

    from lcron_dist.components.profiling import PHASES, peak_memory_mib
    from lcron_dist.config import load_config
    from lcron_dist.distributed.process_group import teardown
    from lcron_dist.models.layers import ONEDNN_LINEAR
    from lcron_dist.trainer import Trainer

    config = load_config(args.config, ["--run.progress=false", f"--run.dir={args.out / 'run'}", *overrides])
    trainer = Trainer(config)
    full = [b for day in trainer.train_days for b in trainer.reader.iter_day(day, shuffle=True)
            if b.size == config.data.batch_size]
    if not full:
        raise SystemExit(f"no full batch of {config.data.batch_size} requests in the training days")
    batches = list(itertools.islice(itertools.cycle(full), args.warmup + args.steps))
    for batch in batches[: args.warmup]:
        trainer.train_step(batch)
    trainer.timer.sync = True
    trainer.timer.seconds.clear()
    per_phase: dict[str, list[float]] = {p: [] for p in PHASES}
    steps: list[float] = []
    for batch in batches[args.warmup:]:
        start = time.perf_counter()
        trainer.train_step(batch)
        steps.append(time.perf_counter() - start)
        for phase in PHASES:
            per_phase[phase].append(trainer.timer.seconds.get(phase, 0.0))
        trainer.timer.seconds.clear()

    trainer.model.eval()
    eval_times: list[float] = []
    eval_requests = 0
    with torch.no_grad():
        for batch in itertools.islice(trainer.eval_reader.iter_day(trainer.test_day, shuffle=False), args.eval_batches):
            start = time.perf_counter()
            _, scores = trainer.model(batch.to(trainer.device), compute_loss=False)
            eval_times.append(time.perf_counter() - start)
            eval_requests += batch.size
    trainer.model.train()

    # After the timed parts, as they add overhead; the operators before the FLOP count, which runs a step
    # under a dispatch mode that sends torch.compile'd functions back to eager for the rest of the run.
    operators = top_operators(trainer, batches[-3:], args.top)
    flops, shape = step_flops(trainer, batches[-1])
    backends = ["aten", "onednn"] if trainer.device.type == "cpu" and ONEDNN_LINEAR is not None else ["aten"]
    sizes = {"4096 x 4096 x 4096": (4096, 4096, 4096)}
    if shape is not None:
        sizes[" x ".join(map(str, shape)) + " (the step's most common)"] = shape
    rates = {f"{name}, {backend}": matmul_rate(*size, trainer.device, backend)
             for name, size in sizes.items() for backend in backends}
    peak = max(rates.values())
    step_s = float(np.median(steps))

    total = sum(steps)
    world = trainer.dist.world_size
    lines = [
        f"config {args.config}; loss {config.loss.name}; batch {config.data.batch_size} per rank; {world} rank(s); "
        f"device {trainer.device}; torch threads {torch.get_num_threads()}; {args.steps} steps after {args.warmup}",
        "",
        "| phase | mean ms | p50 ms | p95 ms | share of step |",
        "|---|---|---|---|---|",
        *[_row(phase, per_phase[phase], total) for phase in PHASES],
        _row("step", steps, total),
        "",
        f"training: {args.steps * config.data.batch_size * world / total:,.0f} requests/s (all ranks)",
        "",
        "| evaluation | mean ms | p50 ms | p95 ms | share |",
        "|---|---|---|---|---|",
        _row(f"batch of {config.data.eval_batch_size}", eval_times, sum(eval_times)),
        "",
        f"evaluation: {eval_requests * world / sum(eval_times):,.0f} requests/s (all ranks)",
        "",
        "## Roofline (rank 0)",
        "",
        f"matrix products per training step: {flops / 1e9:.2f} GFLOP (forward + backward)",
        *[f"matrix-multiply rate, float32 {name}: {rate:,.1f} GFLOP/s" for name, rate in rates.items()],
        f"step (median): {step_s * 1000:.1f} ms, of which {flops / 1e9 / peak * 1000:.1f} ms at the best "
        f"measured rate: the step achieves {flops / 1e9 / step_s:,.1f} GFLOP/s = {flops / 1e9 / step_s / peak:.0%} "
        f"of that rate",
        "",
        f"| top operators (self time, {len(batches[-3:])} steps) | ms per step | share |",
        "|---|---|---|",
        *[f"| {name} | {ms:.1f} | {share:.1%} |" for name, ms, share in operators],
    ]
    text = "\n".join(lines)
    summary = {
        "loss": config.loss.name, "batch_size": config.data.batch_size, "world_size": world,
        "step_ms": total / args.steps * 1000, "requests_per_s": args.steps * config.data.batch_size * world / total,
        "eval_requests_per_s": eval_requests * world / sum(eval_times), **peak_memory_mib(trainer.device),
        "phase_ms": {p: float(np.mean(per_phase[p]) * 1000) for p in PHASES},
        "step_gflop": flops / 1e9, "matmul_gflop_per_s": rates, "achieved_share_of_peak": flops / 1e9 / step_s / peak,
        "top_operators": [{"name": n, "ms_per_step": ms, "share": share} for n, ms, share in operators],
    }
    if trainer.dist.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.md").write_text(text + "\n")
        (args.out / "throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{text}\n\nwritten to {args.out / 'throughput.md'}")
    teardown()


if __name__ == "__main__":
    main()
