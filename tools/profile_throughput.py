"""Where a training step's time goes: per-phase time (mean, p50, p95), requests/s, and the same for evaluation.

Runs the real Trainer for N steps (after warm-up steps, so torch.compile is done) with phase timing
synchronised on every step, then evaluation batches of the test day. Works as one process or under
torchrun (rank 0 reports its own timings, with requests/s for all ranks).

    python tools/profile_throughput.py --config configs/small-2stage.toml [--steps 20] [--out DIR] [overrides]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch


def _row(name: str, seconds: list[float], total: float) -> str:
    ms = np.array(seconds) * 1000
    return (f"| {name} | {ms.mean():.1f} | {np.percentile(ms, 50):.1f} | {np.percentile(ms, 95):.1f} | "
            f"{ms.sum() / 1000 / total:.0%} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--eval-batches", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("runs/profile-throughput"))
    args, overrides = parser.parse_known_args()

    from lcron_dist.components.profiling import PHASES, peak_memory_mib
    from lcron_dist.config import load_config
    from lcron_dist.distributed.process_group import teardown
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
    ]
    text = "\n".join(lines)
    summary = {
        "loss": config.loss.name, "batch_size": config.data.batch_size, "world_size": world,
        "step_ms": total / args.steps * 1000, "requests_per_s": args.steps * config.data.batch_size * world / total,
        "eval_requests_per_s": eval_requests * world / sum(eval_times), **peak_memory_mib(trainer.device),
        "phase_ms": {p: float(np.mean(per_phase[p]) * 1000) for p in PHASES},
    }
    if trainer.dist.is_main:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "throughput.md").write_text(text + "\n")
        (args.out / "throughput.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"{text}\n\nwritten to {args.out / 'throughput.md'}")
    teardown()


if __name__ == "__main__":
    main()
