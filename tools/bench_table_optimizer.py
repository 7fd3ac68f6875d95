"""Table optimizers side by side: the steady training step with sharded tables trained by row-sparse Adam
(fused in the backward) against data-parallel tables trained by torch's dense Adam, and how each step
grows with the vocabulary.

Every variant is one `tools/profile_throughput.py` process (its own Trainer, warm-up, timed steps,
roofline share) on the same data; variants run in alternating order, `--repeats` times, and the table
reports medians with the ratio to the first variant. `--table-rows N [N ...]` adds the same variants
with the video and author tables widened to N rows each (a copy of the dataset's meta.json with the
larger vocabulary beside links to its day folders: the same requests, ids and batches, bigger tables).

    python tools/bench_table_optimizer.py --config configs/recflow-2stage.toml \\
        --data data/bench/dataset-2stage --table-rows 10000000 30000000 [--repeats 2] [overrides]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_train import ensure_dataset, with_dataset_days

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "sharded, row-sparse Adam": ["--parallelism.sharding=table_wise", "--parallelism.table_optimizer=adam"],
    "data-parallel, dense Adam": ["--parallelism.sharding=data_parallel", "--parallelism.table_optimizer=adam"],
}
WIDENED = ("video_id", "author_id")


def widened(data: Path, rows: int, scratch: Path) -> Path:
    """`data` with its video and author vocabularies set to `rows` (meta.json rewritten, days linked)."""
    target = scratch / f"{data.name}-{rows}"
    target.mkdir()
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_sizes"].update({kind: max(rows, meta["vocab_sizes"][kind]) for kind in WIDENED})
    (target / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for day in data.glob("day=*"):
        (target / day.name).symlink_to(day.resolve())
    return target


def measure(config: str, data: Path, variant: list[str], steps: int, out: Path, overrides: list[str]) -> dict:
    """One profile_throughput process; its throughput.json, or {"failed": its last error line}."""
    cmd = [sys.executable, str(REPO / "tools" / "profile_throughput.py"), "--config", config, "--steps", str(steps),
           "--top", "0", "--out", str(out), f"--data.path={data}", *variant, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:  # e.g. killed for memory: reported in its row
        print(proc.stderr[-3000:], file=sys.stderr)
        if proc.returncode < 0:
            return {"failed": f"killed by signal {-proc.returncode}" + (" (out of memory)" if proc.returncode == -9 else "")}
        last = (proc.stderr.strip().splitlines() or [""])[-1]
        return {"failed": f"exit code {proc.returncode}: {last[:200]}"}
    return json.loads((out / "throughput.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/recflow-2stage.toml")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bench" / "dataset-2stage")
    parser.add_argument("--table-rows", type=int, nargs="*", default=[],
                        help="also measure with the video and author tables widened to these row counts")
    parser.add_argument("--requests-per-day", type=int, default=20_000, help="size of the default dataset")
    parser.add_argument("--steps", type=int, default=15, help="profile_throughput's timed steps")
    parser.add_argument("--repeats", type=int, default=2, help="runs of every variant, in alternating order")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-table-optimizer")
    args, overrides = parser.parse_known_args()
    ensure_dataset(args.data, args.requests_per_day)
    overrides = with_dataset_days(args.data, [o for o in overrides if o != "--"])

    with tempfile.TemporaryDirectory() as scratch:
        datasets = {0: args.data, **{rows: widened(args.data, rows, Path(scratch)) for rows in args.table_rows}}
        cases = [(rows, name) for rows in datasets for name in VARIANTS]
        runs: dict[tuple[int, str], list[dict]] = {case: [] for case in cases}
        for repeat in range(args.repeats):
            for rows, name in cases if repeat % 2 == 0 else cases[::-1]:
                result = measure(args.config, datasets[rows], VARIANTS[name], args.steps,
                                 args.out / f"{rows}-{len(runs[(rows, name)])}-{name.split(',')[0]}", overrides)
                runs[(rows, name)].append(result)
                print(f"  {name} ({rows or 'dataset'} rows): " + (result.get("failed") or
                      f"step {result['step_ms']:.1f} ms, {result['requests_per_s']:,.0f} requests/s"), flush=True)

    def median(case: tuple[int, str], key: str) -> float:
        values = [run[key] for run in runs[case] if "failed" not in run]
        return statistics.median(values) if values else float("nan")

    base = median(cases[0], "step_ms")
    lines = [f"config {args.config}, data {args.data}, {args.steps} steps per run, medians of {args.repeats} "
             f"alternating runs", "",
             f"| tables | video / author rows | step ms | requests/s | time vs {cases[0][1]} | time vs its own "
             "at the dataset's vocabulary | share of peak matmul rate | peak RSS MiB | failed runs |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rows, name in cases:
        step = median((rows, name), "step_ms")
        rss = max((run["peak_rss_mib"] for run in runs[(rows, name)] if "failed" not in run), default=float("nan"))
        failed = "; ".join(run["failed"] for run in runs[(rows, name)] if "failed" in run) or "-"
        lines.append(f"| {name} | {rows or 'dataset'} | {step:.1f} | {median((rows, name), 'requests_per_s'):,.0f} "
                     f"| {step / base:.2f}x | {step / median((0, name), 'step_ms'):.2f}x | "
                     f"{median((rows, name), 'achieved_share_of_peak'):.0%} | {rss:,.0f} | {failed} |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table_optimizer.md").write_text(text + "\n")
    print(f"\n{text}\n\nwritten to {args.out / 'table_optimizer.md'}")


if __name__ == "__main__":
    main()
