"""Checkpoint cost: save and load (resume) time and bytes per rank, and the share of training time that
periodic checkpoints take.

For each process count it launches `torchrun` on this script; every rank builds the real Trainer, warms
up, then trains the same `--steps` global steps twice per repeat, back to back: with checkpoints off and
with `--checkpoint.every_steps=N` (day-end saves off in both, so only the periodic saves differ), in
alternating order (off/on, then on/off, ...). The training days are passed over again (a fresh data
cursor, the step count going on) until `--steps` are reached, so a small dataset still sees several
saves. The cost is given two ways: the wall-time difference of the two runs (noisy on a shared machine)
and the time spent inside the saves over the wall time of the run with saves. Then one more save and a
resume from it are timed on every rank, and each rank's shard files (`__<rank>_*.distcp`) are measured;
`.metadata` and `manifest.json` are shared. Prints markdown tables and writes OUT/checkpoint.md and
OUT/checkpoint.json.

    python tools/bench_checkpoint.py --config configs/small-2stage.toml --nprocs 1 2 \\
        [--steps 300] [--every-steps 100] [--repeats 2] [--out DIR] [--section.field=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from lcron_dist.distributed.process_group import launch_local

MIB = 2**20


def worker(args: argparse.Namespace, overrides: list[str]) -> None:
    """One rank: the timed runs, a final save and a resume; rank 0 writes everything to args.report."""
    import torch.distributed as dist

    from lcron_dist.components.progress import TrainProgress
    from lcron_dist.config import load_config
    from lcron_dist.distributed.process_group import teardown
    from lcron_dist.trainer import Trainer

    work = Path(args.work)
    config = load_config(args.config, ["--run.progress=false", f"--run.dir={work / 'run'}", *overrides,
                                       "--checkpoint.every_steps=0", "--checkpoint.at_day_end=false",
                                       "--checkpoint.resume=none"])
    trainer = Trainer(config)
    rank = trainer.dist.rank
    saves: list[float] = []
    save = trainer.save_checkpoint

    def timed_save() -> Path:  # what every save costs this rank, collectives and fsync included
        start = time.perf_counter()
        path = save()
        saves.append(time.perf_counter() - start)
        return path

    trainer.save_checkpoint = timed_save  # train() saves through this attribute

    batches = trainer.reader.iter_day(trainer.train_days[0], shuffle=True)
    for batch in itertools.islice(batches, args.warmup):  # torch.compile, allocator, page cache
        trainer.train_step(batch)
    batches.close()

    def train(every: int, folder: str) -> dict:
        trainer.config.checkpoint.every_steps = every
        trainer.checkpointer.root = work / folder
        saves.clear()
        trainer.progress = TrainProgress()
        dist.barrier()
        start = time.perf_counter()
        while trainer.progress.step < args.steps:  # whole passes over the training days
            trainer.progress = TrainProgress(step=trainer.progress.step)
            trainer.train(trainer.train_days)
        dist.barrier()
        return {"every_steps": every, "steps": trainer.progress.step, "wall_s": time.perf_counter() - start,
                "saves_s": list(saves)}

    repeats = []
    for repeat in range(args.repeats):
        order = [("off", 0), ("on", args.every_steps)]
        if repeat % 2:  # off, on, on, off, ...: neither setting always runs second, on a machine that drifts
            order.reverse()
        repeats.append({key: train(every, f"{key}-{repeat}") for key, every in order})
        if rank == 0:
            shutil.rmtree(work / f"on-{repeat}", ignore_errors=True)

    trainer.checkpointer.root = work / "final"
    saves.clear()
    path = trainer.save_checkpoint()
    dist.barrier()
    start = time.perf_counter()
    trainer.maybe_resume(str(path))
    load_s = time.perf_counter() - start
    mine = {"rank": rank, "save_s": saves[0], "load_s": load_s,
            "shard_bytes": sum(f.stat().st_size for f in path.glob(f"__{rank}_*.distcp")), "repeats": repeats}
    everyone: list = [None] * trainer.dist.world_size
    dist.all_gather_object(everyone, mine)
    if trainer.dist.is_main:
        files = {f.name: f.stat().st_size for f in path.iterdir() if f.is_file()}
        shared = sum(size for name, size in files.items() if not name.endswith(".distcp"))
        Path(args.report).write_text(json.dumps({"ranks": everyone, "shared_bytes": shared,
                                                 "total_bytes": sum(files.values()), "files": len(files)}))
    teardown()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _tables(runs: list[dict], every: int) -> str:
    lines = ["| processes | rank | shard files MiB | save s | periodic saves s (mean) | load (resume) s |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        for r in run["ranks"]:
            periodic = [s for rep in r["repeats"] for s in rep["on"]["saves_s"]]
            lines.append(f"| {run['nprocs']} | {r['rank']} | {r['shard_bytes'] / MIB:,.1f} | {r['save_s']:.2f} | "
                         f"{_mean(periodic):.2f} | {r['load_s']:.2f} |")
    lines.append("")
    lines += [f"{run['nprocs']} process(es): {run['files']} files, {run['total_bytes'] / MIB:,.1f} MiB in total, "
              f"of which {run['shared_bytes'] / 2**10:,.1f} KiB shared (.metadata, manifest.json)" for run in runs]
    lines += ["", f"| processes | repeat | steps | saves | wall s, no checkpoints | wall s, every {every} steps | "
              f"wall difference | time in saves / wall |", "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for row in run["cost"]:
            lines.append(f"| {run['nprocs']} | {row['repeat']} | {row['steps']} | {row['saves']} | "
                         f"{row['wall_off_s']:.1f} | {row['wall_on_s']:.1f} | {row['wall_overhead']:+.1%} | "
                         f"{row['save_share']:.2%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small-2stage.toml")
    parser.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=300, help="global steps of each timed training run")
    parser.add_argument("--every-steps", type=int, default=100, help="checkpoint.every_steps of the run with saves")
    parser.add_argument("--repeats", type=int, default=2, help="pairs of runs (without, with saves) per process count")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-checkpoint"))
    parser.add_argument("--work", help=argparse.SUPPRESS)  # worker mode
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    if "RANK" in os.environ:
        worker(args, overrides)
        return

    repo = Path(__file__).resolve().parents[1]
    out = args.out.resolve()
    runs = []
    for nprocs in args.nprocs:
        work = out / f"work-{nprocs}"  # checkpoints go to the disk of --out, not to a RAM-backed /tmp
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        report = work / "report.json"
        start = time.perf_counter()
        proc = launch_local(Path(__file__).resolve(), nprocs, [
            "--config", args.config, "--work", str(work), "--report", str(report), "--steps", str(args.steps),
            "--every-steps", str(args.every_steps), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
            *overrides], max(1, os.cpu_count() // nprocs), repo, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"{nprocs} process(es) failed:\n{stdout[-2000:]}\n{stderr[-4000:]}")
        run = {"nprocs": nprocs, **json.loads(report.read_text())}
        shutil.rmtree(work, ignore_errors=True)
        run["cost"] = []
        for i in range(args.repeats):
            off = max((r["repeats"][i]["off"] for r in run["ranks"]), key=lambda x: x["wall_s"])
            on = max((r["repeats"][i]["on"] for r in run["ranks"]), key=lambda x: x["wall_s"])
            run["cost"].append({"repeat": i + 1, "steps": on["steps"], "saves": len(on["saves_s"]),
                                "wall_off_s": off["wall_s"], "wall_on_s": on["wall_s"],
                                "wall_overhead": on["wall_s"] / off["wall_s"] - 1,
                                "save_share": sum(on["saves_s"]) / on["wall_s"]})
        runs.append(run)
        print(f"  {nprocs} process(es): {run['total_bytes'] / MIB:,.1f} MiB per checkpoint, "
              f"{time.perf_counter() - start:.0f} s", flush=True)

    header = (f"config {args.config} {' '.join(overrides)}; machine: {os.cpu_count()} cores; OMP threads per rank = "
              f"cores / processes; {args.warmup} warm-up steps, then per repeat {args.steps}+ steps without "
              f"checkpoints and the same with checkpoint.every_steps={args.every_steps} (day-end saves off)")
    text = f"{header}\n\n{_tables(runs, args.every_steps)}"
    summary = {"config": args.config, "overrides": overrides, "cores": os.cpu_count(), "steps": args.steps,
               "every_steps": args.every_steps, "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoint.md").write_text(text + "\n")
    (out / "checkpoint.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{text}\n\nwritten to {out / 'checkpoint.md'}")


if __name__ == "__main__":
    main()
