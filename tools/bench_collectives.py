"""What a collective costs on this machine's process group at the message sizes of a training step.

Launches N local ranks (torchrun, gloo on CPU) that time all-to-all, reduce-scatter and all-reduce of
float32 messages from a few KB to tens of MB (bytes per rank: what each rank sends): the median time of
one call, and the bandwidth it amounts to (bytes per rank / time). Small messages show the fixed cost
of a call (latency), large ones the transfer rate. A sharded step sends per embedding collection about
B·slots·features·D·4 bytes of pooled embeddings each way (small-2stage's item collection: 256 x 90 x 8
x 8 x 4 = 5.9 MB), and a few KB of KJT lengths and splits.

    python tools/bench_collectives.py [--nprocs 2] [--sizes-kib 4 64 1024 8192 32768] [--seconds 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

COLLECTIVES = ("all_to_all", "reduce_scatter", "all_reduce")


def worker(args: argparse.Namespace) -> None:
    """One rank: time every collective at every size; rank 0 writes the medians to args.report."""
    import torch
    import torch.distributed as dist

    from lcron_dist.distributed.process_group import init_distributed, teardown

    init_distributed()
    world = dist.get_world_size()
    results = {}
    for kib in args.sizes_kib:
        numel = max(world, kib * 1024 // 4 // world * world)  # divisible by the world size
        send, out = torch.randn(numel), torch.empty(numel)
        shard = torch.empty(numel // world)
        calls = {
            "all_to_all": lambda: dist.all_to_all_single(out, send),
            "reduce_scatter": lambda: dist.reduce_scatter_tensor(shard, send),
            "all_reduce": lambda: dist.all_reduce(out),
        }
        for name in COLLECTIVES:
            call = calls[name]
            call()  # warm-up
            times: list[float] = []
            deadline = time.perf_counter() + args.seconds
            while True:  # every rank makes the same number of calls: rank 0 decides when to stop
                dist.barrier()
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
                more = torch.tensor([float(time.perf_counter() < deadline or len(times) < 5)])
                dist.broadcast(more, 0)
                if not more.item():
                    break
            results[f"{name}/{kib}"] = statistics.median(times)
    if dist.get_rank() == 0:
        Path(args.report).write_text(json.dumps({"world": world, "seconds": results}))
    teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nprocs", type=int, default=2)
    parser.add_argument("--sizes-kib", type=int, nargs="+", default=[4, 64, 1024, 8192, 32768],
                        help="message sizes, KiB sent per rank")
    parser.add_argument("--seconds", type=float, default=0.3, help="timing per collective and size")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--report", help=argparse.SUPPRESS)  # worker mode
    args = parser.parse_args()
    if "RANK" in os.environ:
        worker(args)
        return

    from lcron_dist.distributed.process_group import launch_local

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp, "report.json")
        proc = launch_local(Path(__file__).resolve(), args.nprocs, [
            "--report", str(report), "--seconds", str(args.seconds), "--sizes-kib", *map(str, args.sizes_kib)],
            args.threads, Path(__file__).resolve().parents[1], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise SystemExit(out[-4000:])
        measured = json.loads(report.read_text())
    seconds = measured["seconds"]
    print(f"{measured['world']} ranks (gloo, this machine), {args.threads} torch thread(s) each; median time of one "
          f"call, and KiB per rank / time\n")
    print("| KiB per rank | " + " | ".join(f"{name} ms | {name} GB/s" for name in COLLECTIVES) + " |")
    print("|---|" + "---|---|" * len(COLLECTIVES))
    for kib in args.sizes_kib:
        cells = []
        for name in COLLECTIVES:
            s = seconds[f"{name}/{kib}"]
            cells += [f"{s * 1000:.3f}", f"{kib * 1024 / s / 1e9:.2f}"]
        print(f"| {kib:,} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
