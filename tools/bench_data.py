"""Throughput and peak memory of the data path: synthetic twin generation and raw -> Parquet conversion.

Two raw layouts are measured, since RecFlow promises neither a row order nor a pickle protocol:
"grouped" (all_stage rows grouped by request, default pickles, as `lcron-data synth` writes by default)
and "shuffled" (all_stage rows in a random order, protocol-4 pickles). Each phase runs in a fresh child
process so its peak RSS is its own. A worker's memory grows with the size of a day, so it is reported
per 1,000 requests of a day above the worker's baseline (interpreter and libraries), and projected to a
RecFlow-size day. Prints a markdown table.

    python tools/bench_data.py --preset small [--requests-per-day R] [--workers 1 2] [--repeat N]
                               [--compare-with OLD_CHECKOUT] [--work-dir DIR]

--compare-with times the converter of another checkout too (e.g. `git worktree add /tmp/old REV`), run
by run in turn with this one's, so that both see the same load on a shared machine; each figure is the
fastest of --repeat runs. With --work-dir, twins already generated there are reused.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

RECFLOW_DAY_REQUESTS = 264_000
"""Requests of a RecFlow day (Period 1: 6.06 M requests over 23 days)."""

LAYOUTS = {
    "grouped": dict(),
    "shuffled": dict(shuffle_rows=True, pickle_protocol=4),
}
"""SynthConfig overrides of each measured raw layout."""

SYNTH_REPORT = "others/synth_report.json"
"""synth.REPORT_PATH, which gives a twin's sizes. (This process never imports synth: it loads torch, and a
child's peak RSS counts its parent's from before the exec.)"""

THIS_CHECKOUT = "this checkout"


def _peak_rss() -> int:
    """Peak RSS in bytes of this process and of its largest finished child (a pool worker)."""
    return 1024 * max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process, its threads and its finished children."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def _synth(out: str, preset: str, overrides: dict, queue: mp.Queue) -> None:
    from lcron_dist.data import synth

    config = synth.SynthConfig.preset(preset, **overrides)
    start, cpu = time.perf_counter(), _cpu_seconds()
    synth.generate(config, Path(out), progress=False)
    queue.put((time.perf_counter() - start, _cpu_seconds() - cpu, _peak_rss(), None))


def _convert(src: str, out: str, workers: int, checkout: str, queue: mp.Queue) -> None:
    if checkout != THIS_CHECKOUT:
        sys.path.insert(0, checkout)
    import pandas  # noqa: F401  (pyarrow imports it on its first array conversion: once per process, not per day)

    from lcron_dist.data import convert

    if checkout != THIS_CHECKOUT and not convert.__file__.startswith(checkout):
        raise SystemExit(f"{checkout} does not hold lcron_dist: imported {convert.__file__}")
    baseline = _peak_rss()  # libraries loaded; pool workers are forked from here
    start, cpu = time.perf_counter(), _cpu_seconds()
    convert.convert(Path(src), Path(out), workers=workers, progress=False)
    queue.put((time.perf_counter() - start, _cpu_seconds() - cpu, _peak_rss(), baseline))


def _run(target, *args) -> tuple:
    """Run target(*args, queue) in a fresh process and return what it put on the queue."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    proc = context.Process(target=target, args=(*args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive():  # it failed before putting its result
                raise SystemExit(f"{target.__name__} failed with exit code {proc.exitcode}") from None
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=["tiny", "small", "medium"])
    parser.add_argument("--days", type=int, help="days per twin (overrides the preset)")
    parser.add_argument("--requests-per-day", type=int, help="requests per day (overrides the preset)")
    parser.add_argument("--layouts", nargs="+", choices=sorted(LAYOUTS), default=list(LAYOUTS), help="raw layouts to measure")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="convert worker counts to measure")
    parser.add_argument("--repeat", type=int, default=1, help="conversions of each kind; the fastest is reported")
    parser.add_argument("--compare-with", type=Path, help="another checkout whose converter is timed too")
    parser.add_argument("--work-dir", type=Path, help="where to write, twins kept and reused (default: a temporary folder, removed)")
    args = parser.parse_args()

    checkouts = [THIS_CHECKOUT] + ([str(args.compare_with.resolve())] if args.compare_with else [])
    sizes = {k: v for k, v in (("days", args.days), ("requests_per_day", args.requests_per_day)) if v is not None}
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_data_"))
    rows = []
    try:
        for layout in args.layouts:
            twin = work / "-".join(["raw", args.preset, *(f"{v}{k[0]}" for k, v in sizes.items()), layout])
            reused = args.work_dir is not None and (twin / SYNTH_REPORT).exists()
            if not reused:
                shutil.rmtree(twin, ignore_errors=True)
                measured = _run(_synth, str(twin), args.preset, sizes | LAYOUTS[layout])
            config = json.loads((twin / SYNTH_REPORT).read_text())["config"]
            requests = config["days"] * config["requests_per_day"]
            rows.append((layout, "synth (reused)" if reused else "synth", THIS_CHECKOUT, 1, requests,
                         None if reused else measured))
            for workers in args.workers:
                out = work / f"dataset-{layout}-w{workers}"
                shutil.rmtree(out, ignore_errors=True)
                runs = {checkout: [] for checkout in checkouts}
                for _ in range(args.repeat):
                    for checkout in checkouts:  # in turn, so that each sees the same load
                        runs[checkout].append(_run(_convert, str(twin), str(out), workers, checkout))
                        shutil.rmtree(out)
                rows += [(layout, "convert", checkout, workers, requests, min(runs[checkout])) for checkout in checkouts]
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)

    per_day = config["requests_per_day"]
    print(f"\nmachine: {platform.machine()}, {mp.cpu_count()} cores (load {os.getloadavg()[0]:.1f}), "
          f"Python {platform.python_version()}; preset {args.preset}: {config['days']} day(s) x {per_day:,} requests")
    print("layouts: " + "; ".join(f"{name} {overrides or 'defaults (rows grouped, protocol 5)'}"
                                  for name, overrides in LAYOUTS.items() if name in args.layouts) + "\n")
    header = ["layout", "phase", "code", "workers", "requests", "seconds", "requests/s", "requests/s per worker",
              "requests per CPU-second", "peak RSS per worker (MiB)", "MiB per 1,000 requests of a day",
              f"projected peak per worker, {RECFLOW_DAY_REQUESTS:,}-request day (GiB)"]
    print("| " + " | ".join(header) + " |")
    print("|---" * len(header) + "|")
    for layout, phase, checkout, workers, count, measured in rows:
        cells = [layout, phase, checkout, workers, f"{count:,}"] + [""] * (len(header) - 5)
        if measured is not None:
            seconds, cpu, peak, baseline = measured
            rate = count / seconds
            cells[5:10] = [f"{seconds:.2f}", f"{rate:,.0f}", f"{rate / workers:,.0f}", f"{count / cpu:,.0f}",
                           f"{peak / 2**20:,.0f}"]
            if baseline is not None:  # a worker holds one or two days above its baseline
                per_request = (peak - baseline) / per_day
                cells[10:] = [f"{per_request * 1000 / 2**20:.1f}",
                              f"{(baseline + per_request * RECFLOW_DAY_REQUESTS) / 2**30:.1f}"]
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"\nMiB per 1,000 requests: (peak - worker baseline of {baseline / 2**20:.0f} MiB) / requests per day, so "
          f"fixed costs of a conversion count too: an upper bound that falls as days grow. Projection: baseline + "
          f"that x {RECFLOW_DAY_REQUESTS:,}.")


if __name__ == "__main__":
    main()
