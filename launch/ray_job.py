"""lcron-train as a Ray cluster job: the same Trainer under Ray Train, data streamed by Ray Data.

    ray job submit --working-dir . -- python launch/ray_job.py --config configs/small-2stage.toml \\
        --num-workers 4 [--use-gpu] [--cpus-per-worker 1] [--section.field=value ...]
    python launch/ray_job.py --config configs/tiny-2stage.toml --num-workers 2     # a local Ray

Ray Train's TorchTrainer starts the workers and their process group (gloo on CPU, NCCL on GPU); each
worker builds the Trainer exactly as under torchrun and reads its share of every day through the Ray
reader, so results land in the config's run folder as with torchrun.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def train_loop(job: dict) -> None:
    """One Ray Train worker: the Trainer of lcron-train, on the process group Ray set up."""
    from lcron_dist.config import load_config
    from lcron_dist.trainer import Trainer

    Trainer(load_config(job["config"], job["overrides"])).run()


def _absolute(overrides: list[str], config_path: str) -> list[str]:
    """Workers run in their own folders: make the run and data paths absolute."""
    from lcron_dist.config import load_config

    config = load_config(config_path, overrides)
    return [*overrides, f"--run.dir={Path(config.run.dir).resolve()}", f"--data.path={Path(config.data.path).resolve()}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per worker, NCCL")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", ""),
                        help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    args, overrides = parser.parse_known_args(argv)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lcron_dist.data.ray_reader import init_ray

    config_path = str(Path(args.config).resolve())
    overrides = _absolute(["--data.reader=ray", *overrides], config_path)
    # A local Ray needs CPU slots beyond the workers' for Ray Data's read tasks, or reads wait forever.
    local_cpus = int(args.num_workers * args.cpus_per_worker) + 2
    init_ray(args.address, num_cpus=local_cpus, object_store_mb=512)
    run_dir = Path(next(o for o in reversed(overrides) if o.startswith("--run.dir=")).split("=", 1)[1])
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config_path, "overrides": overrides},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(run_dir.parent.resolve()), name=f"{run_dir.name}-ray"),
    )
    result = trainer.fit()
    ray.shutdown()
    if result.error is not None:
        print(f"ray_job: training failed: {result.error}", file=sys.stderr)
        return 1
    print(f"results in {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
