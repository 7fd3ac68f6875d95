"""Readers compared: time to first batch and steady-state requests/s, local (pyarrow) vs Ray Data.

For each reader and world size, every rank's share of the training days is read in turn in this
process (ranks of a real job read in parallel, each its own share), the way the trainer reads: the
next day prefetched while the current one is consumed. No training, so this is the data path alone.

    python tools/bench_readers.py --dataset data/demo/dataset-2stage [--world-sizes 1 2] [--batch-size 1024]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def measure(reader, days) -> tuple[float, float, int]:
    """(seconds to the first batch, requests/s after it, requests) for one rank over `days`."""
    start = time.perf_counter()
    first, requests = None, 0
    for i, day in enumerate(days):
        if i + 1 < len(days):
            reader.prefetch(days[i + 1], shuffle=True)
        for batch in reader.iter_day(day, shuffle=True):
            if first is None:
                first = time.perf_counter() - start
                steady_start = time.perf_counter()
            else:
                requests += batch.size
    steady = time.perf_counter() - steady_start
    return first, requests / max(steady, 1e-9), requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=Path("data/demo/dataset-2stage"))
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--days", type=int, default=4, help="training days read (the first ones)")
    args = parser.parse_args()

    import ray

    from lcron_dist.data.ray_reader import RayReader
    from lcron_dist.data.reader import LocalReader

    rows = []
    for name, cls in (("local", LocalReader), ("ray", RayReader)):
        for world in args.world_sizes:
            per_rank = []
            for rank in range(world):
                reader = cls(args.dataset, args.batch_size, rank, world, seed=0)
                per_rank.append(measure(reader, reader.meta.day_list[: args.days]))
            rows.append((name, world, per_rank))
            print(f"  {name} × {world}: first batch {max(r[0] for r in per_rank):.2f} s", flush=True)
    ray.shutdown()

    print(f"\nmachine: {os.cpu_count()} cores; dataset {args.dataset}; {args.days} days; batch {args.batch_size}; "
          "ranks read one after another here (each rank's figures are its own)\n")
    print("| reader | ranks | time to first batch s (per rank) | steady requests/s (per rank) | requests/s if ranks read in parallel |")
    print("|---|---|---|---|---|")
    for name, world, per_rank in rows:
        first = " / ".join(f"{r[0]:.2f}" for r in per_rank)
        rate = " / ".join(f"{r[1]:,.0f}" for r in per_rank)
        print(f"| {name} | {world} | {first} | {rate} | {sum(r[1] for r in per_rank):,.0f} |")


if __name__ == "__main__":
    main()
