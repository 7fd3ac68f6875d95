"""Peak memory of a training step against batch size and against candidates per request N.

Each point is a fresh process (so its peak is its own) that builds the real Trainer and runs a few
training steps. For N beyond the dataset's, every request's candidate groups are widened by tiling
them (the model and loss scale with N; the sorting losses are O(N²) per request). Next to the
measurements: the sharding plan's estimate for the tables (weights, optimizer state, I/O buffers).
Prints a table and writes a PNG.

    python tools/profile_memory.py --config configs/small-2stage.toml [--batch-sizes 64 256 1024] \\
        [--candidates 40 80 160] [--out runs/profile-memory] [overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def widen(batch, factor: int, group_size: int):
    """The batch with every candidate group repeated `factor` times in place (N → factor·N)."""
    import torch

    from lcron_dist.data.batch import Batch

    def tile(x: torch.Tensor) -> torch.Tensor:  # [..., G·S] -> [..., G·factor·S]
        groups = x.reshape(*x.shape[:-1], -1, group_size)
        return groups.repeat_interleave(factor, dim=-2).reshape(*x.shape[:-1], -1)

    return Batch(batch.request_id, batch.user, tile(batch.item), batch.history, batch.hist_len,
                 tile(batch.label), tile(batch.mask), tile(batch.target))


def worker(args: argparse.Namespace, overrides: list[str]) -> None:
    import resource

    import torch

    from lcron_dist.config import load_config
    from lcron_dist.data import dataset
    from lcron_dist.distributed.process_group import teardown
    from lcron_dist.trainer import Trainer

    config = load_config(args.config, ["--run.progress=false", f"--data.batch_size={args.batch}", *overrides])
    meta = dataset.load_meta(config.data.path)
    factor = args.n // meta.num_candidates
    if factor > 1:  # the loss's layout grows with the groups
        config.loss.options["group_size"] = meta.group_size * factor
    trainer = Trainer(config)
    batches = [b for b in trainer.reader.iter_day(trainer.train_days[-1], shuffle=True) if b.size == args.batch][:3]
    for batch in batches:
        trainer.train_step(widen(batch, factor, meta.group_size) if factor > 1 else batch)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if trainer.device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    plan = (Path(config.run.dir) / "plan.md").read_text()
    tables = float(next(line.split("|")[2] for line in plan.splitlines() if line.startswith("| 0 |")).replace(",", ""))
    Path(args.report).write_text(json.dumps({"peak_mib": peak, "plan_tables_mib": tables}))
    teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--candidates", type=int, nargs="+", default=[40, 80, 160])
    parser.add_argument("--out", type=Path, default=Path("runs/profile-memory"))
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.report:
        worker(args, overrides)
        return

    from lcron_dist.config import load_config
    from lcron_dist.data import dataset

    config = load_config(args.config, overrides)
    base_n = dataset.load_meta(config.data.path).num_candidates
    bad = [n for n in args.candidates if n % base_n]
    if bad:
        parser.error(f"--candidates must be multiples of the dataset's N={base_n}, got {bad}")
    mid_batch = args.batch_sizes[len(args.batch_sizes) // 2]
    points = [(b, base_n) for b in args.batch_sizes] + [(mid_batch, n) for n in args.candidates if n != base_n]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for b, n in points:
        report = args.out / f"b{b}-n{n}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--config", args.config, "--batch", str(b), "--n", str(n),
               "--report", str(report), f"--run.dir={args.out / f'run-b{b}-n{n}'}", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"B={b} N={n} failed:\n{proc.stderr[-4000:]}")
        rows.append((b, n, json.loads(report.read_text())))
        print(f"  B={b:<5} N={n:<4} peak {rows[-1][2]['peak_mib']:,.0f} MiB", flush=True)

    lines = ["| batch B | candidates N | peak MiB (measured, rank 0) | tables MiB (plan estimate, rank 0) |",
             "|---|---|---|---|"]
    lines += [f"| {b} | {n} | {r['peak_mib']:,.0f} | {r['plan_tables_mib']:,.1f} |" for b, n, r in rows]
    text = "\n".join(lines)
    (args.out / "memory.md").write_text(text + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    by_b = [(b, r["peak_mib"]) for b, n, r in rows if n == base_n]
    by_n = [(n, r["peak_mib"]) for b, n, r in rows if b == mid_batch]
    axes[0].plot(*zip(*by_b), marker="o")
    axes[0].set_xlabel(f"batch size (N={base_n})")
    axes[1].plot(*zip(*sorted(by_n)), marker="o")
    axes[1].set_xlabel(f"candidates per request N (batch {mid_batch})")
    for ax in axes:
        ax.set_ylabel("peak MiB")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out / "memory.png", dpi=120)
    plt.close(fig)
    print(f"\n{text}\n\nwritten to {args.out}/memory.md and memory.png")


if __name__ == "__main__":
    main()
