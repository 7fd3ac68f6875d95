"""`lcron-stream`: the streaming protocol (the paper's Figure 2) for one or more methods.

    lcron-stream --config configs/small-2stage.toml --days 2024-02-01:2024-02-04 [--methods lcron,bce] [overrides]

For each method and each day t of --days: train on the days before t, continuing from the model
trained through t−1, then test on t. Writes RUN/stream.csv (day, method, joint recall, per-stage
metrics) and RUN/stream.png (joint recall per day per method), and each method's run folder under
RUN/<method>/. Runs under whatever launcher starts it (one process, torchrun).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from lcron_dist.config import load_config
from lcron_dist.data import schema
from lcron_dist.distributed.process_group import teardown


def write_csv(rows: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Joint recall per test day, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ax.plot([r["day"][5:] for r in mine], [r["joint_recall"] for r in mine], marker="o", label=method)
    ax.set_xlabel("test day (trained on every day before it)")
    ax.set_ylabel("joint Recall@10@20")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcron-stream", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--days", required=True, type=schema.parse_days, help="test days: FIRST:LAST or a list")
    parser.add_argument("--methods", default=None, help="comma-separated losses (default: the config's)")
    args, overrides = parser.parse_known_args(argv)
    try:
        base = load_config(args.config, overrides)
        methods = [m.strip() for m in (args.methods or base.loss.name).split(",") if m.strip()]
        configs = [load_config(args.config, [*overrides, f"--loss.name={m}", f"--run.dir={Path(base.run.dir) / m}"])
                   for m in methods]
    except ValueError as exc:
        parser.error(str(exc))
    from lcron_dist.trainer import Trainer

    rows: list[dict] = []
    failed = True
    try:
        for config in configs:
            trainer = Trainer(config)
            rows += trainer.stream(args.days)
        if trainer.dist.is_main:
            out = Path(base.run.dir)
            write_csv(rows, out / "stream.csv")
            plot(rows, out / "stream.png", f"{Path(args.config).stem}: streaming protocol")
            print(f"wrote {out / 'stream.csv'} and {out / 'stream.png'}")
        failed = False
    except ValueError as exc:
        print(f"lcron-stream: error: {exc}", file=sys.stderr)
        return 2
    finally:
        teardown(failed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
