"""Scaling on this machine: requests/s, peak RSS per rank, and the share of step time in communication.

For each config and process count it launches `torchrun` on this script; every rank builds the real
Trainer, warms up, times N training steps, then runs a few more under torch.profiler. The profiler
stays out of the timed steps: its own cost grows with what a step records, more with more ranks (2 x 1
steps of small-2stage: 162-216 ms in four runs timed under it, 117-137 ms in four runs half an hour
later without it, while 1 x 1 stayed at 90-111 ms). Communication time is the CPU time
of the collective ops the profiler records (gloo/NCCL all-reduce, all-to-all, reduce-scatter,
all-gather, broadcast, and their waits); the share is that over the profiled steps' time. Collectives
that run asynchronously (DDP's all-reduce of data-parallel tables) count only for the time the step
waits on them, so the ceiling below is the better measure of what communication costs. A second table
names the collective ops counted: calls and self time per step on each rank.

For each process count N > 1 it also runs N independent one-process jobs at once, each with the same
threads: their summed requests/s is what this machine gives N processes that never talk (shared
caches, memory bandwidth), the ceiling for N ranks. The jobs start their timed steps together (each
waits, after its warm-up, until all are ready) and each keeps training, untimed, until every job has
finished its timed steps, so no job is timed while another is still starting up or already done
(which would make the ceiling look higher than it is); the table gives the share of the timed steps
during which every other job was training too. Every process count runs --repeats times, in
alternating order (1, 2, then 2, 1, ...): the machine's speed drifts between runs (one process's step
ranged 96-111 ms across four runs in one hour), so the table gives medians and each repeat's speed-up
over the one-process run of the same repeat. Prints a markdown table.

    python tools/bench_scaling.py --configs configs/tiny-2stage.toml configs/small-2stage.toml --nprocs 1 2 \\
        [--steps 8] [--profiled-steps 4] [--threads T] [--repeats 3] [--nodes 2] [-- --data.path=... overrides]

With --threads 1, "2 x 1 vs 1 x 1" is the speedup from a second process alone (the default gives each
process cores / processes threads, so 1 process uses every core). With --nodes M every multi-process job
runs as M torchrun agents on this machine, as M hosts would (each its own LOCAL_WORLD_SIZE, so the
planner sees M hosts). Steps run through the trainer's loop (train.pipeline: TorchRec's train pipeline
by default), each timed call filling and draining the pipeline once.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import re
import resource
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lcron_dist.distributed.process_group import RendezvousStore, launch_local

COMM = re.compile(r"all_?reduce|all_?to_?all|all2all|reduce_?scatter|all_?gather|broadcast|c10d|gloo|nccl|record_param_comms|"
                  r"wait_tensor|_wait", re.IGNORECASE)


def worker(args: argparse.Namespace, overrides: list[str]) -> None:
    """One rank: time `steps` training steps and report to rank 0, which writes args.report."""
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from lcron_dist.config import load_config
    from lcron_dist.distributed.process_group import teardown
    from lcron_dist.trainer import Trainer

    config = load_config(args.config, ["--run.progress=false", *overrides])
    trainer = Trainer(config)
    full = [b for day in trainer.train_days for b in trainer.reader.iter_day(day, shuffle=True)
            if b.size == config.data.batch_size]
    if not full:
        raise SystemExit(f"no full batch of {config.data.batch_size} requests in the training days")
    more = itertools.cycle(full)  # small data: batches are reused

    def train(steps: int) -> None:  # through the trainer's loop: the train pipeline when train.pipeline
        collections.deque(trainer.train_batches(itertools.islice(more, steps)), maxlen=0)

    train(args.warmup)
    sync = Path(args.sync_dir) if args.sync_dir else None
    if sync is not None:
        wait_for_all(sync, "ready", args.job, args.jobs)
    dist.barrier()
    window_start, start = time.time(), time.perf_counter()
    train(args.steps)
    seconds = time.perf_counter() - start
    window_end = time.time()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        profiled_start = time.perf_counter()
        train(args.profiled_steps)
        profiled_seconds = time.perf_counter() - profiled_start
    if sync is not None:  # keep the machine as busy for the other jobs until they are done too
        wait_for_all(sync, "done", args.job, args.jobs, step=lambda: train(1))
    collectives = [e for e in prof.key_averages() if COMM.search(e.key)]
    comm_us = sum(e.self_cpu_time_total for e in collectives)
    mine = {
        "window": [window_start, window_end],
        "busy_until": time.time(),  # training from window_start until then
        "rank": trainer.dist.rank,
        "step_ms": seconds / args.steps * 1000,
        "comm_share": comm_us / 1e6 / profiled_seconds,
        "collectives": {e.key: [e.count / args.profiled_steps, e.self_cpu_time_total / 1000 / args.profiled_steps]
                        for e in collectives},  # name -> [calls, self ms] per step
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "requests_per_s": args.steps * config.data.batch_size / seconds,
        "threads": torch.get_num_threads(),
        "nodes": trainer.dist.world_size // int(os.environ["LOCAL_WORLD_SIZE"]),  # as torchrun launched them
    }
    everyone = [None] * trainer.dist.world_size
    dist.all_gather_object(everyone, mine)
    if trainer.dist.is_main:
        Path(args.report).write_text(json.dumps(everyone))
    teardown()


def wait_for_all(sync: Path, stage: str, job: int, jobs: int, step: Callable[[], object] | None = None,
                 timeout: float = 900.0) -> None:
    """Mark job `job` as at `stage` in `sync`, then wait until all `jobs` jobs are, running `step` meanwhile."""
    (sync / f"{stage}-{job}").touch()
    deadline = time.monotonic() + timeout
    while len(list(sync.glob(f"{stage}-*"))) < jobs:
        if time.monotonic() > deadline:
            raise SystemExit(f"job {job}: not all {jobs} jobs reached {stage!r} within {timeout:.0f} s")
        if step is None:
            time.sleep(0.002)
        else:
            step()


def overlap(ranks: list[dict]) -> float:
    """The least share of a job's timed window during which every other job was training too."""
    shares = []
    for i, mine in enumerate(ranks):
        start, end = mine["window"]
        for other in ranks[:i] + ranks[i + 1:]:
            start, end = max(start, other["window"][0]), min(end, other["busy_until"])
        shares.append(max(0.0, end - start) / (mine["window"][1] - mine["window"][0]))
    return min(shares)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["configs/tiny-2stage.toml", "configs/small-2stage.toml"])
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--profiled-steps", type=int, default=4, help="steps profiled for the communication share")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: cores / processes)")
    parser.add_argument("--nodes", type=int, default=1,
                        help="launch each multi-process job as this many torchrun agents (hosts) on this machine")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every process count, in alternating order")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--report", help=argparse.SUPPRESS)
    parser.add_argument("--sync-dir", help=argparse.SUPPRESS)  # independent jobs: where they meet
    parser.add_argument("--job", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=1, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if any(n > 1 and n % args.nodes for n in args.nprocs):
        parser.error(f"--nodes {args.nodes} must divide every process count > 1 of --nprocs")
    if "RANK" in os.environ:
        worker(args, overrides)
        return

    runs: dict[tuple[str, int], list[dict]] = {}
    for config in args.configs:
        for repeat in range(args.repeats):
            # Process counts in alternating order, so a machine drifting one way favours none of them.
            for nprocs in args.nprocs if repeat % 2 == 0 else args.nprocs[::-1]:
                threads = args.threads or max(1, os.cpu_count() // nprocs)
                ranks = run_jobs(config, [nprocs], threads, args, overrides, nodes=args.nodes if nprocs > 1 else 1)
                independent = run_jobs(config, [1] * nprocs, threads, args, overrides) if nprocs > 1 else []
                run = {"ranks": ranks, "total": sum(r["requests_per_s"] for r in ranks) / len(ranks) * nprocs,
                       "ceiling": sum(r["requests_per_s"] for r in independent) if independent else None,
                       "together": overlap(independent) if independent else None}
                runs.setdefault((config, nprocs), []).append(run)
                print(f"  {config} × {nprocs} (repeat {repeat + 1}): {run['total']:,.0f} requests/s"
                      + (f"; {nprocs} independent 1-process jobs: {run['ceiling']:,.0f}" if independent else ""),
                      flush=True)

    threads = f"{args.threads}" if args.threads else "cores / processes"
    print(f"\nmachine: {os.cpu_count()} cores; {args.steps} timed steps after {args.warmup} warm-up, then "
          f"{args.profiled_steps} profiled for the communication share; torch threads per rank: {threads}; "
          f"{args.repeats} repeat(s): medians, and the speed-up of each repeat over that repeat's 1 process\n")
    print("| config | processes x threads | requests/s (all ranks) | vs 1 process | vs 1 process per repeat | "
          "independent jobs (ceiling) | vs ceiling | independent jobs all training | step ms (per rank) | "
          "peak RSS MiB (per rank) | communication share (per rank) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (config, nprocs), repeats in runs.items():
        single = runs.get((config, 1))
        single_total = statistics.median(r["total"] for r in single) if single else None
        total = statistics.median(r["total"] for r in repeats)
        middle = sorted(repeats, key=lambda r: r["total"])[(len(repeats) - 1) // 2]  # the median run's ranks
        speedup = f"{total / single_total:.2f}x" if single else "-"
        each_repeat = " / ".join(f"{r['total'] / s['total']:.2f}x" for r, s in zip(repeats, single)) if single else "-"
        ceilings = [r["ceiling"] for r in repeats if r["ceiling"]]
        ceiling = statistics.median(ceilings) if ceilings else None
        independent = (f"{ceiling:,.0f} ({ceiling / single_total:.2f}x)" if ceiling and single
                       else f"{ceiling:,.0f}" if ceiling else "-")
        together = f"{min(r['together'] for r in repeats):.1%}" if ceiling else "-"

        def each(key: str, fmt: str) -> str:
            return " / ".join(format(rank[key], fmt) for rank in middle["ranks"])

        nodes = middle["ranks"][0]["nodes"]
        hosts = f" ({nodes} nodes)" if nodes > 1 else ""
        print(f"| {Path(config).stem} | {nprocs} x {middle['ranks'][0]['threads']}{hosts} | {total:,.0f} | {speedup} | "
              f"{each_repeat} | {independent} | {f'{total / ceiling:.0%}' if ceiling else '-'} | {together} | "
              f"{each('step_ms', '.0f')} | {each('peak_rss_mib', ',.0f')} | {each('comm_share', '.2%')} |")
    print_collectives(runs, top=10)


def print_collectives(runs: dict[tuple[str, int], list[dict]], top: int) -> None:
    """The collective ops counted in the communication share, per step of each rank of the median run:
    which, how many calls, how much self time (the most expensive `top` per config and process count)."""
    print("\n| config | processes | collective op | calls per step (per rank) | self ms per step (per rank) |")
    print("|---|---|---|---|---|")
    for (config, nprocs), repeats in runs.items():
        if nprocs == 1:
            continue
        ranks = sorted(repeats, key=lambda r: r["total"])[(len(repeats) - 1) // 2]["ranks"]
        names = {name for rank in ranks for name in rank["collectives"]}
        cost = {name: max(rank["collectives"].get(name, [0, 0])[1] for rank in ranks) for name in names}
        for name in sorted(names, key=cost.get, reverse=True)[:top]:
            per_rank = [rank["collectives"].get(name, [0, 0]) for rank in ranks]
            print(f"| {Path(config).stem} | {nprocs} | {name} | {' / '.join(f'{c:g}' for c, _ in per_rank)} | "
                  f"{' / '.join(f'{ms:.2f}' for _, ms in per_rank)} |")


def run_jobs(config: str, sizes: list[int], threads: int, args: argparse.Namespace, overrides: list[str],
             nodes: int = 1) -> list[dict]:
    """Launch one torchrun job per entry of `sizes` (its process count), all at once, each as `nodes`
    torchrun agents of sizes[i] / nodes processes (one rendezvous); every rank's report."""
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        logs = [Path(tmp, f"log{i}.txt").open("w") for i in range(len(sizes))]
        sync = ["--sync-dir", tmp, "--jobs", str(len(sizes))] if len(sizes) > 1 else []
        jobs = []
        for i, n in enumerate(sizes):
            rendezvous = RendezvousStore()
            jobs += [(i, launch_local(Path(__file__).resolve(), n // nodes, [
                "--config", config, "--report", f"{tmp}/report{i}.json", "--steps", str(args.steps),
                "--warmup", str(args.warmup), "--profiled-steps", str(args.profiled_steps), *sync, "--job", str(i),
                f"--run.dir={tmp}/run{i}", *overrides],
                threads, repo, nnodes=nodes, rendezvous=rendezvous, stdout=logs[i], stderr=subprocess.STDOUT))
                for _ in range(nodes)]
        for i, job in jobs:
            if job.wait() != 0:
                raise SystemExit(f"{config} × {sizes[i]} failed:\n{Path(tmp, f'log{i}.txt').read_text()[-4000:]}")
        for log in logs:
            log.close()
        return [rank for i in range(len(sizes)) for rank in json.loads(Path(tmp, f"report{i}.json").read_text())]


if __name__ == "__main__":
    main()
