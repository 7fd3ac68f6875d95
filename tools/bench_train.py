"""Training and evaluation speed of this tree against a reference commit, measured in one invocation.

Absolute requests/s do not travel between machines, so this reports ratios from runs made back to back
on one machine. For each side (the reference commit, checked out into a temporary git worktree, and
this working tree) and each repeat, in pairs whose order alternates (ref, ours, then ours, ref, ...), so that
a machine whose speed drifts one way during the invocation favours neither side:
- `lcron-train` end to end on the dataset: its `train_requests_per_s` (results.json: every training
  step of the day loop, torch.compile and data loading included) and the process's wall time;
- that side's own `tools/profile_throughput.py`: steady-state training and evaluation requests/s.
Both sides run with the same config name (each from its own tree), overrides, environment and threads;
unless overridden, every day of the dataset but the last trains and the last tests. Before the pairs,
each side trains once unmeasured (--warmup), so that both find their torch.compile artifacts in the
on-disk cache: a checkout's first run compiles from scratch, and in a run that first met the reference
that alone made the first pair's end-to-end ratio 2.92x against 1.80x in the second.
The dataset defaults to a 2-day twin of 20,000 requests per day (the `medium` preset's size), written
on first use. Prints a markdown table and writes OUT/bench_train.md and OUT/bench_train.json.
Besides the ratio of the two sides' medians, the table gives the median and range of the ratios of
each back-to-back pair (ref run i, ours run i): on a shared machine whose speed drifts between runs,
a pair sees the same conditions more nearly than two medians do.

    python tools/bench_train.py --ref 4e9a2db [--config configs/recflow-2stage.toml] [--data DATASET]
        [--repeats 3] [--warmup 1] [--out DIR] [--section.field=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OVERRIDES = ["--parallelism.sharding=data_parallel"]
"""The issue's setting: recflow-2stage with data-parallel tables (fused Adam tables need CUDA)."""


def ensure_dataset(path: Path, requests_per_day: int) -> None:
    """A 2-day, 2-stage twin at `path` (train on the first day, test on the second), made if absent."""
    if (path / "meta.json").exists():
        return
    raw = path.parent / f"{path.name}-raw"
    bin_dir = Path(sys.executable).parent
    print(f"writing the benchmark dataset {path} ({requests_per_day:,} requests per day)", flush=True)
    subprocess.run([bin_dir / "lcron-data", "synth", "--preset", "medium", "--days", "2",
                    "--requests-per-day", str(requests_per_day), "--out", raw], check=True)
    subprocess.run([bin_dir / "lcron-data", "convert", "--src", raw, "--out", path, "--stages", "2"], check=True)


def run(cmd: list[str], root: Path, log: Path) -> float:
    """Run `cmd` in `root` with `root` first on the import path; returns its wall time."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{log.read_text()[-3000:]}")
    return seconds


def pair_order(repeat: int) -> tuple[str, str]:
    """The sides of pair `repeat` in the order they run: the reference first in even pairs, ours first in odd ones.

    With the reference always first, a machine slowing down through an invocation (seen: 0.92x-0.95x in
    every pair of a run comparing bit-identical training steps) reads as a slower tree.
    """
    return ("ref", "ours") if repeat % 2 == 0 else ("ours", "ref")


def with_dataset_days(data: Path, overrides: list[str]) -> list[str]:
    """`overrides`, training on every day of `data` but its last and testing on that, unless they set days
    (the recipes' days are RecFlow's)."""
    if any(o.startswith(("--data.train_days", "--data.test_day")) for o in overrides):
        return overrides
    days = sorted(json.loads((data / "meta.json").read_text())["days"])
    return [*overrides, f"--data.train_days={days[0]}:{days[-2]}", f"--data.test_day={days[-1]}"]


def common_args(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """The arguments both lcron-train and profile_throughput take."""
    return ["--config", args.config, f"--data.path={args.data.resolve()}", "--run.progress=false", *overrides]


def train(root: Path, work: Path, args: argparse.Namespace, overrides: list[str]) -> float:
    """lcron-train of one side into `work`/train; returns the process's wall time."""
    work.mkdir(parents=True)
    return run([sys.executable, "-m", "lcron_dist.train", *common_args(args, overrides), f"--run.dir={work / 'train'}"],
               root, work / "train.log")


def measure(root: Path, work: Path, args: argparse.Namespace, overrides: list[str]) -> dict:
    """One repeat of one side: lcron-train end to end, then profile_throughput."""
    wall = train(root, work, args, overrides)
    common = common_args(args, overrides)
    results = json.loads((work / "train" / "results.json").read_text())
    run([sys.executable, "tools/profile_throughput.py", *common, "--steps", str(args.steps),
         "--out", str(work / "profile")], root, work / "profile.log")
    profile = json.loads((work / "profile" / "throughput.json").read_text())
    return {"train_requests_per_s": results["train_requests_per_s"], "train_seconds": results["train_seconds"],
            "process_seconds": wall, "joint_recall": results["joint_recall"],
            "steady_requests_per_s": profile["requests_per_s"], "eval_requests_per_s": profile["eval_requests_per_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="4e9a2db", help="reference commit (default: main before issue 11)")
    parser.add_argument("--config", default="configs/recflow-2stage.toml")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "bench" / "dataset-2stage")
    parser.add_argument("--requests-per-day", type=int, default=20_000, help="size of the default dataset")
    parser.add_argument("--repeats", type=int, default=3,
                        help="measured pairs (end-to-end pair ratios spread 1.86x-2.64x in one invocation of 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured lcron-train runs per side before the pairs")
    parser.add_argument("--steps", type=int, default=15, help="profile_throughput's timed steps")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-train")
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"] or DEFAULT_OVERRIDES
    ensure_dataset(args.data, args.requests_per_day)
    overrides = with_dataset_days(args.data, overrides)

    rows: dict[str, list[dict]] = {"ref": [], "ours": []}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        ref_root = Path(tmp) / "ref"
        # A run killed by a signal never reached its `worktree remove`: forget worktrees whose folder is gone.
        subprocess.run(["git", "-C", REPO, "worktree", "prune"], check=True)
        subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "--quiet", ref_root, args.ref], check=True)
        try:
            roots = {"ref": ref_root, "ours": REPO}
            for repeat in range(args.warmup):
                for side in pair_order(repeat):
                    seconds = train(roots[side], Path(tmp) / f"warmup-{side}-{repeat}", args, overrides)
                    print(f"  {side} warm-up #{repeat + 1}: {seconds:.1f} s (not measured)", flush=True)
            for repeat in range(args.repeats):
                for side in pair_order(repeat):
                    row = measure(roots[side], Path(tmp) / f"{side}-{repeat}", args, overrides)
                    rows[side].append(row)
                    print(f"  {side} #{repeat + 1}: end to end {row['train_requests_per_s']:,.0f} requests/s, "
                          f"steady {row['steady_requests_per_s']:,.0f}, eval {row['eval_requests_per_s']:,.0f}",
                          flush=True)
        finally:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", ref_root], check=False)

    keys = [("train_requests_per_s", "lcron-train end to end, requests/s"),
            ("steady_requests_per_s", "training steady state (profile_throughput), requests/s"),
            ("eval_requests_per_s", "evaluation (profile_throughput), requests/s"),
            ("process_seconds", "lcron-train process wall time, s"),
            ("joint_recall", "joint recall (test day)")]
    median = {side: {k: statistics.median(r[k] for r in runs) for k, _ in keys} for side, runs in rows.items()}
    commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"config {args.config} {' '.join(overrides)}; data {args.data}; {os.cpu_count()} cores; "
             f"torch threads per process: {os.environ.get('OMP_NUM_THREADS', 'torch default')}; "
             f"median of {args.repeats} runs per side in pairs of alternating order, "
             f"after {args.warmup} unmeasured run(s) per side",
             "", f"| measure | ref {args.ref} | ours ({commit} + working tree) | ours / ref | ours / ref per pair: median (range) |",
             "|---|---|---|---|---|"]
    pairs = {key: [o[key] / r[key] for r, o in zip(rows["ref"], rows["ours"])] for key, _ in keys}
    for key, label in keys:
        ref, ours = median["ref"][key], median["ours"][key]
        lines.append(f"| {label} | {ref:,.4g} | {ours:,.4g} | {ours / ref:.2f}x | {statistics.median(pairs[key]):.2f}x "
                     f"({min(pairs[key]):.2f}-{max(pairs[key]):.2f}) |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_train.md").write_text(text + "\n")
    (args.out / "bench_train.json").write_text(json.dumps({"runs": rows, "median": median, "pair_ratios": pairs}, indent=2) + "\n")
    print(f"\n{text}\n\nwritten to {args.out / 'bench_train.md'}")


if __name__ == "__main__":
    main()
