"""Serving cost of exported cascades: latency per request at batch 1 (p50, p99), requests/s at batch 64, size.

    .venv/bin/python tools/bench_serving.py --exports runs/export-fp32 runs/export-int8 \
        --data data/demo/dataset-2stage --day 2024-02-04 [--threads 1 2] [--latency-requests 500]

Each export is loaded from its folder alone (lcron_dist.serving.runtime: torch, fbgemm, pyarrow) and runs
the funnel of lcron-score's serving pass on the day's first requests: every stage scores what the
previous one kept, the quotas select. Prints a Markdown table; --out also writes the rows as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from lcron_dist.data import schema
from lcron_dist.data.reader import DayArrays
from lcron_dist.serving.runtime import ExportedCascade
from lcron_dist.serving.score import export_bytes, latency, load_scored_day, serve_day


def first_requests(arrays: DayArrays, count: int) -> DayArrays:
    """The day's first `count` requests (all of them if fewer)."""
    return {name: values[:count] for name, values in arrays.items()}


def bench(export: Path, data: Path, day: str, threads: int, latency_requests: int, throughput_requests: int,
          batch_size: int) -> dict:
    torch.set_num_threads(threads)
    meta, arrays = load_scored_day(export, data, schema.parse_day(day))
    cascade = ExportedCascade(export)
    timed = latency(cascade, arrays, meta, latency_requests)
    served = serve_day(cascade, first_requests(arrays, throughput_requests), meta, batch_size)
    return {"export": str(export), "dtype": cascade.manifest["dtype"], "stages": len(cascade.stages), "threads": threads,
            "p50_ms": timed["p50_ms"], "p99_ms": timed["p99_ms"], "latency_requests": timed["requests"],
            "batch": batch_size, "requests_per_s": served["requests_per_s"], "served_joint_recall": served["joint_recall"],
            "export_mib": export_bytes(cascade) / 2**20, "table_mib": cascade.manifest["table_bytes"]["exported"] / 2**20}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--exports", nargs="+", type=Path, required=True, help="export folders (lcron-export --out)")
    parser.add_argument("--data", type=Path, required=True, help="a converted dataset")
    parser.add_argument("--day", required=True, help="the day whose requests are served")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()], help="torch threads")
    parser.add_argument("--latency-requests", type=int, default=500, help="requests timed one by one")
    parser.add_argument("--throughput-requests", type=int, default=4096, help="requests served in batches")
    parser.add_argument("--batch-size", type=int, default=64, help="requests per call for requests/s")
    parser.add_argument("--out", type=Path, help="also write the rows here (JSON)")
    args = parser.parse_args(argv)
    rows = [bench(export, args.data, args.day, threads, args.latency_requests, args.throughput_requests,
                  args.batch_size) for export in args.exports for threads in args.threads]
    columns = ["export", "dtype", "threads", "p50_ms", "p99_ms", "requests_per_s", "served_joint_recall",
               "table_mib", "export_mib"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
