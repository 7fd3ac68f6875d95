"""Training throughput of the real Trainer step (TorchRec tables, DeepSpeed dense, the configured loss).

Builds the Trainer from a config, warms up (torch.compile compiles on the first steps), then times N
steps on one training day and prints requests/s per process.

    python tools/bench_train.py --config configs/small-2stage.toml --steps 10 [--section.field=value ...]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    args, overrides = parser.parse_known_args()

    from lcron_dist.config import load_config
    from lcron_dist.distributed.process_group import teardown
    from lcron_dist.trainer import Trainer

    config = load_config(args.config, ["--run.progress=false", *overrides])
    trainer = Trainer(config)
    day = trainer.train_days[-1]
    batches = []
    while len(batches) < args.warmup + args.steps:  # full batches only, repeating the day if needed
        batches += [b for b in trainer.reader.iter_day(day, shuffle=True) if b.size == config.data.batch_size]
    for batch in batches[: args.warmup]:
        trainer.train_step(batch)
    start = time.perf_counter()
    for batch in batches[args.warmup: args.warmup + args.steps]:
        trainer.train_step(batch)
    seconds = time.perf_counter() - start
    rate = args.steps * config.data.batch_size / seconds
    print(f"machine: {platform.machine()}, torch threads {torch.get_num_threads()}; config {args.config} "
          f"loss {config.loss.name} batch {config.data.batch_size} compile {config.model.compile}")
    print(f"{args.steps} steps in {seconds:.2f} s: {seconds / args.steps * 1000:.0f} ms/step, {rate:,.0f} requests/s")
    teardown()


if __name__ == "__main__":
    main()
