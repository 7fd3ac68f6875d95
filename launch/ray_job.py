"""lcron-train as a Ray cluster job: the same Trainer under Ray Train, data streamed by Ray Data.

    ray job submit --working-dir . -- python launch/ray_job.py --config configs/small-2stage.toml \\
        --num-workers 4 [--use-gpu] [--cpus-per-worker 1] [--max-failures 3] [--section.field=value ...]
    python launch/ray_job.py --config configs/tiny-2stage.toml --num-workers 2     # a local Ray

Ray Train's TorchTrainer starts the workers and their process group (gloo on CPU, NCCL on GPU); each
worker builds the Trainer exactly as under torchrun and reads its share of every day through the Ray
reader, so results land in the config's run folder as with torchrun.

Fault tolerance: every checkpoint the Trainer commits (RUN/checkpoints/step-<N>, see
components.checkpoint) is reported to Ray Train, which copies it into its run storage
(RUN_PARENT/<run name>-ray/checkpoint_*, the newest checkpoint.keep kept); Ray's registration of that
copy is the point from which Ray restarts. When a worker dies (or its node), Ray Train restarts the
whole worker group up to --max-failures times, and every new worker resumes from Ray's latest
checkpoint (`--checkpoint.resume=<that folder>`): its manifest names this run folder, so the run goes
on exactly where it stopped (step, data cursor, counters) rather than warm-starting. A restart before
the first report starts as configured (checkpoint.resume, "auto" by default). Launching again with the
same run folder makes Ray restore its run: the first workers already resume from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Ray Train's record of the checkpoints of a run, in its storage folder (ray.train.v2 CheckpointManager).
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def report_checkpoint(path: Path, manifest: dict) -> None:
    """Trainer.on_checkpoint: report a committed checkpoint to Ray Train (called on every rank).

    Every rank calls ray.train.report at the same points (it is a barrier across workers); only rank 0
    attaches the folder, which every rank's shards went into, so Ray copies it once into its storage.
    """
    import ray.train

    metrics = {f"progress/{key}": value for key, value in manifest["progress"].items()}
    if ray.train.get_context().get_world_rank() == 0:
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(path)))
    else:
        ray.train.report(metrics, checkpoint=None)


def train_loop(job: dict) -> dict:
    """One Ray Train worker: the Trainer of lcron-train, on the process group Ray set up.

    Returns:
        The run's results and the Ray Train checkpoint this attempt resumed from, if any (rank 0's
        return value becomes Result.return_value).
    """
    import ray.train

    from lcron_dist.config import load_config
    from lcron_dist.trainer import Trainer

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"results": Trainer(load_config(job["config"], job["overrides"]), report_checkpoint).run(),
                "resumed_from": None}
    # A local storage path is used in place; a remote one is downloaded for as long as the Trainer
    # loads it (the Trainer reads the checkpoint while it is built).
    with checkpoint.as_directory() as folder:
        trainer = Trainer(load_config(job["config"], [*job["overrides"], f"--checkpoint.resume={folder}"]),
                          report_checkpoint)
    return {"results": trainer.run(), "resumed_from": str(folder)}


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
    parser.add_argument("--max-failures", type=int, default=0,
                        help="restarts of the worker group after a worker fails, each from the latest reported "
                             "checkpoint (-1: unlimited). Default 0, as Ray Train's: a crash or a bug fails the job "
                             "at once instead of repeating; node preemptions are retried apart from this count "
                             "(FailureConfig.max_preemption_failures, unlimited by default)")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS", ""),
                        help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    args, overrides = parser.parse_known_args(argv)

    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from lcron_dist.config import load_config
    from lcron_dist.data.ray_reader import init_ray

    config_path = str(Path(args.config).resolve())
    overrides = _absolute(["--data.reader=ray", *overrides], config_path)
    config = load_config(config_path, overrides)
    run_dir = Path(config.run.dir)
    storage, name = run_dir.parent, f"{run_dir.name}-ray"
    if config.checkpoint.resume != "auto" and (storage / name / RAY_SNAPSHOT).exists():
        # Ray would restore that run and hand its latest checkpoint to the workers, overriding the choice.
        print(f"ray_job: {storage / name} holds Ray Train's checkpoints of an earlier launch of this run, "
              f"which Ray resumes from; with checkpoint.resume={config.checkpoint.resume} use another run.dir "
              f"(or remove that folder)", file=sys.stderr)
        return 2
    # A local Ray needs CPU slots beyond the workers' for Ray Data's read tasks, or reads wait forever.
    local_cpus = int(args.num_workers * args.cpus_per_worker) + 2
    init_ray(args.address, num_cpus=local_cpus, object_store_mb=512)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config_path, "overrides": overrides},
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu,
                                     resources_per_worker={"CPU": args.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo"),
        run_config=RunConfig(storage_path=str(storage), name=name,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep)),
    )
    try:
        result = trainer.fit()  # Ray Train V2 raises a run's error; V1 returns it in result.error
    except ray.train.TrainingFailedError as exc:
        result = exc
    finally:
        ray.shutdown()
    error = result if isinstance(result, Exception) else result.error
    if error is not None:
        print(f"ray_job: training failed: {error}", file=sys.stderr)
        return 1
    resumed_from = (getattr(result, "return_value", None) or {}).get("resumed_from")
    if resumed_from:
        print(f"ray_job: the last attempt resumed from Ray Train's checkpoint {resumed_from}")
    print(f"results in {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
