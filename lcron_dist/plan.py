"""`lcron-plan`: TorchRec's sharding plan for a config on a cluster you don't have, without training.

    lcron-plan --config configs/recflow-3stage.toml --world-size 16 --device cuda --hbm-gb 80

Builds the cascade's tables on the meta device at the full RecFlow vocabulary sizes (or a converted
dataset's, with --dataset), runs the planner for the given world size and device limits, and prints
per table its sharding and ranks, and per rank the estimated memory (weights, optimizer state, I/O
buffers) — how many GPUs the setting needs and how memory falls as ranks are added — and the estimated
checkpoint size: what each rank writes of its table shards, and the replicated part written once.
"""

from __future__ import annotations

import argparse
import sys

import torch

from lcron_dist.config import load_config
from lcron_dist.data import dataset, schema


TABLE_MEMORY = {
    "adam": "weight + m + v = 12 bytes",
    "partial_rowwise_adam": "weight + m = 8 bytes, and v = 4 bytes per row",
    "rowwise_adagrad": "weight = 4 bytes, and the sum of squares = 4 bytes per row",
    "adagrad": "weight + sum of squares = 8 bytes",
    "sgd": "weight = 4 bytes",
}


def recflow_vocab_sizes(device_ids: int) -> dict[str, int]:
    """Table rows per feature kind for the full published RecFlow (ids + 1 for padding)."""
    counts = {**schema.RECFLOW_ID_COUNTS, "device_id": device_ids}
    return dataset.vocab_sizes({name: counts[name] for name in schema.ID_FIELDS})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcron-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--world-size", type=int, required=True, help="ranks (GPUs or CPU processes)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--hbm-gb", type=float, help="GPU memory per rank, GiB (overrides parallelism.hbm_gb)")
    parser.add_argument("--ddr-gb", type=float, help="host memory per rank, GiB (overrides parallelism.ddr_gb)")
    parser.add_argument("--local-world-size", type=int, help="ranks per host (default: min(8, world size))")
    parser.add_argument("--dataset", help="take vocabulary sizes from this converted dataset's meta.json")
    parser.add_argument("--device-ids", type=int, default=schema.RECFLOW_NUM_DEVICES,
                        help="device_id vocabulary (not in RecFlow's id_cnt.pkl; default: the distinct device ids "
                             "of its logs, 42,561)")
    args, overrides = parser.parse_known_args(argv)
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    for flag, field in ((args.hbm_gb, "hbm_gb"), (args.ddr_gb, "ddr_gb")):
        if flag is not None:
            overrides.append(f"--parallelism.{field}={flag}")
    overrides.append(f"--parallelism.local_world_size={args.local_world_size or min(8, args.world_size)}")
    try:
        config = load_config(args.config, overrides)
    except ValueError as exc:
        parser.error(str(exc))

    from torchrec.distributed.planner.types import PlannerError

    from lcron_dist.distributed.sharding import (
        build_planner,
        build_sharder,
        checkpoint_bytes,
        describe_checkpoint_size,
        describe_plan,
        describe_table_optimizer,
        placements,
    )
    from lcron_dist.losses import build_loss
    from lcron_dist.models import Cascade

    if args.dataset:
        meta = dataset.load_meta(args.dataset)
        vocab, slots = meta.vocab_sizes, schema.item_slots(meta.num_candidates, meta.seq_len)
    else:
        vocab = recflow_vocab_sizes(args.device_ids)
        slots = schema.item_slots(schema.StageSetting(config.model.num_stages).num_candidates, schema.SEQ_LEN)
    model = Cascade(config.model, vocab, build_loss(config.loss.name, num_stages=config.model.num_stages), device="meta")
    try:
        planner = build_planner(model, config, args.device, args.world_size, slots)
        planner.plan(model, [build_sharder(config)])
    except (PlannerError, ValueError) as exc:
        print(f"no plan for {args.world_size} rank(s) on {args.device}: {str(exc).splitlines()[0]}")
        return 1
    p = config.parallelism
    print(f"{args.config}: {config.model.num_stages}-stage, world size {args.world_size} on {args.device}"
          f"{f', {p.hbm_gb:g} GiB HBM per rank' if p.hbm_gb else ''}; default sharding {p.sharding}, "
          f"table optimizer {p.table_optimizer}, batch {config.data.batch_size} requests per rank")
    tables = placements(planner)
    print(describe_plan(tables, args.world_size))
    print()
    print(f"table optimizer: {describe_table_optimizer(config, torch.device(args.device), {t.table: t.sharding for t in tables})}")
    print(f"its memory per table element (fp32): {TABLE_MEMORY[p.table_optimizer]}")
    dense_params = sum(param.numel() for param in model.dense.parameters())
    print()
    print(describe_checkpoint_size(*checkpoint_bytes(tables, p.table_optimizer, dense_params, args.world_size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
