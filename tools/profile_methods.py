"""Every loss of the paper on one config: peak memory and time per pass (the paper's Appendix D).

Each method runs `tools/profile_throughput.py` in its own process (so peak memory is its own), on the
same config, batches and seed; time per pass is the config's training requests over the measured
requests/s. Prints a markdown table and writes it with every method's throughput table.

    python tools/profile_methods.py --config configs/small-2stage.toml [--methods lcron,bce] [--steps 10] [overrides]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lcron_dist.losses import LOSSES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--methods", default=",".join(LOSSES))
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/profile-methods"))
    args, overrides = parser.parse_known_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LOSSES]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(LOSSES)}")

    from lcron_dist.config import load_config
    from lcron_dist.data import dataset
    from lcron_dist.trainer import resolve_days

    config = load_config(args.config, overrides)
    meta = dataset.load_meta(config.data.path)
    train_days, _ = resolve_days(config, meta.day_list)
    pass_requests = sum(meta.days[str(d)] for d in train_days)

    rows = []
    for method in methods:
        out = args.out / method
        cmd = [sys.executable, str(Path(__file__).with_name("profile_throughput.py")), "--config", args.config,
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--out", str(out),
               f"--loss.name={method}", *overrides]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{method} failed:\n{proc.stderr[-4000:]}")
        summary = json.loads((out / "throughput.json").read_text())
        rows.append((method, summary))
        print(f"  {method:<16} {summary['requests_per_s']:,.0f} requests/s", flush=True)

    memory_key = "peak_allocated_mib" if "peak_allocated_mib" in rows[0][1] else "peak_rss_mib"
    lines = [f"config {args.config}: {pass_requests:,} training requests per pass; batch {config.data.batch_size}; "
             f"memory = {memory_key.replace('_', ' ')} of the process", "",
             "| method | peak memory MiB | step ms | forward ms | backward ms | requests/s | time per pass s |",
             "|---|---|---|---|---|---|---|"]
    for method, s in rows:
        lines.append(f"| {method} | {s[memory_key]:,.0f} | {s['step_ms']:.0f} | {s['phase_ms']['forward']:.0f} | "
                     f"{s['phase_ms']['backward']:.0f} | {s['requests_per_s']:,.0f} | "
                     f"{pass_requests / s['requests_per_s']:,.1f} |")
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "methods.md").write_text(text + "\n")
    print(f"\n{text}\n\nwritten to {args.out / 'methods.md'}")


if __name__ == "__main__":
    main()
