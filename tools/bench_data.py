"""Throughput and peak memory of the data path: synthetic twin generation and raw -> Parquet conversion.

Each phase runs in a fresh child process so its peak RSS is its own. Prints a markdown table.

    python tools/bench_data.py --preset small [--workers 1 2] [--work-dir /tmp/bench_data]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path


def _synth(out: str, preset: str, queue: mp.Queue) -> None:
    from lcron_dist.data import synth

    config = synth.SynthConfig.preset(preset)
    start = time.perf_counter()
    synth.generate(config, Path(out), progress=False)
    seconds = time.perf_counter() - start
    queue.put((config.days * config.requests_per_day, seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def _convert(src: str, out: str, workers: int, queue: mp.Queue) -> None:
    from lcron_dist.data import convert

    start = time.perf_counter()
    report = convert.convert(Path(src), Path(out), workers=workers, progress=False)
    seconds = time.perf_counter() - start
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    queue.put((sum(r.requests for r in report.results), seconds, peak))


def _run(target, *args) -> tuple[int, float, int]:
    queue: mp.Queue = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"{target.__name__} failed with exit code {proc.exitcode}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="convert worker counts to measure")
    parser.add_argument("--work-dir", type=Path, help="where to write (default: a temporary folder, removed)")
    args = parser.parse_args()

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    rows = []
    try:
        requests, seconds, peak = _run(_synth, str(work / "raw"), args.preset)
        rows.append(("synth", 1, requests, seconds, peak))
        for workers in args.workers:
            out = work / f"dataset-w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            requests, seconds, peak = _run(_convert, str(work / "raw"), str(out), workers)
            rows.append(("convert", workers, requests, seconds, peak))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\nmachine: {platform.machine()}, {mp.cpu_count()} cores, Python {platform.python_version()}; preset {args.preset}\n")
    print("| phase | workers | requests | seconds | requests/s | requests/s per worker | peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|")
    for phase, workers, requests, seconds, peak in rows:
        rate = requests / seconds
        print(f"| {phase} | {workers} | {requests:,} | {seconds:.2f} | {rate:,.0f} | {rate / workers:,.0f} | {peak / 1024:,.0f} |")


if __name__ == "__main__":
    main()
