"""Every method × several seeds on one config -> a markdown table like the paper's Table 2 (mean ± std).

Each run is a real `lcron-train` job (its own process) writing RUN/<method>-seed<k>/results.json; runs
already complete are reused, so an interrupted comparison resumes where it stopped.

    python tools/compare_methods.py --config configs/small-2stage.toml --seeds 0 1 2 [--out runs/compare] \\
        [--methods lcron,bce,...] [-- --data.path=... any lcron-train override]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lcron_dist.data import schema
from lcron_dist.losses import LOSSES


def run_one(config: str, method: str, seed: int, run_dir: Path, overrides: list[str]) -> dict:
    """Train one method with one seed (reusing a finished run), returning its results.json."""
    results = run_dir / "results.json"
    if results.exists():
        return json.loads(results.read_text())
    cmd = [sys.executable, "-m", "lcron_dist.train", "--config", config, f"--loss.name={method}",
           f"--train.seed={seed}", f"--run.dir={run_dir}", "--run.progress=false", *overrides]
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{method} seed {seed} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(results.read_text())
    print(f"  {method:<16} seed {seed}: joint recall {out['joint_recall']:.4f} "
          f"({time.perf_counter() - start:.0f} s, {out['train_requests_per_s']:,.0f} requests/s)", flush=True)
    return out


def _cell(values: list[float]) -> str:
    """Mean ± sample standard deviation; a single run has no spread, so only its value."""
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: dict[str, list[dict]], num_stages: int) -> str:
    """Markdown: joint recall and every stage's Recall@10@m and NDCG@10, mean ± std over seeds (the value
    alone for one seed)."""
    stages = schema.STAGE_NAMES[num_stages]
    quotas = schema.SERVING_QUOTAS[num_stages]
    header = ["method", "joint Recall@10@20"]
    for stage, m in zip(stages, quotas):
        header += [f"{stage} Recall@10@{m}", f"{stage} NDCG@10"]
    header.append("requests/s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, runs in results.items():
        row = [method, _cell([r["joint_recall"] for r in runs])]
        for stage in stages:
            row += [_cell([r["stages"][stage]["recall"] for r in runs]),
                    _cell([r["stages"][stage]["ndcg@10"] for r in runs])]
        row.append(f"{statistics.fmean(r['train_requests_per_s'] for r in runs):,.0f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--methods", default=",".join(LOSSES), help="comma-separated (default: every loss)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LOSSES]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(LOSSES)}")

    from lcron_dist.config import load_config

    num_stages = load_config(args.config, overrides).model.num_stages
    print(f"{len(methods)} method(s) × {len(args.seeds)} seed(s) on {args.config} -> {args.out}", flush=True)
    results = {m: [run_one(args.config, m, s, args.out / f"{m}-seed{s}", overrides) for s in args.seeds]
               for m in methods}
    text = table(results, num_stages)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table.md").write_text(text + "\n")
    print(f"\n{text}\n\ntable written to {args.out / 'table.md'}")


if __name__ == "__main__":
    main()
