"""Two gloo ranks in one test process group: sharded forward = unsharded forward, every shard trains."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch

from lcron_dist.data import convert
from lcron_dist.distributed.process_group import RendezvousStore
from ranks import run_ranks  # tests/ is on sys.path (conftest.py's folder)

SHARDING = ["--parallelism.sharding=table_wise", "--parallelism.table_sharding.video_id=row_wise",
            "--parallelism.table_sharding.author_id=data_parallel", "--parallelism.table_optimizer=rowwise_adagrad",
            "--parallelism.zero_stage=2", "--run.progress=false", "--train.max_steps_per_day=1",
            "--checkpoint.at_day_end=false"]



def _rank_main(rank: int, world: int, rendezvous: dict, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", **rendezvous)
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from lcron_dist.config import load_config
    from lcron_dist.distributed.process_group import teardown
    from lcron_dist.distributed.sharding import _table_rows
    from lcron_dist.losses import build_loss
    from lcron_dist.models import Cascade
    from lcron_dist.trainer import Trainer

    config = load_config("configs/tiny-2stage.toml", [f"--data.path={data}", f"--run.dir={out}/run", *SHARDING])
    trainer = Trainer(config)
    prefetched = [(str(day), shuffle) for day, shuffle in trainer.reader._pending]  # by the set-up
    meta = trainer.reader.meta
    batch = next(trainer.reader.iter_day(trainer.train_days[0], shuffle=False))

    # The same cascade, unsharded, with the tables' initial rows and the engine's dense weights.
    reference = Cascade(config.model, meta.vocab_sizes, build_loss(config.loss.name, num_stages=2), device="cpu")
    reference.dense.load_state_dict(trainer.model.module.dense.state_dict())
    for name, weight in reference.named_parameters():
        if ".embedding_bags." in name:
            table = name.split(".")[-2]
            weight.data.copy_(_table_rows(config.train.seed, table, *weight.shape, 0, weight.shape[0]))
    trainer.model.eval()
    with torch.no_grad():
        _, sharded = trainer.model(batch, compute_loss=False)
        _, unsharded = reference(batch, compute_loss=False)
    forward_gap = max((a - b).abs().max().item() for a, b in zip(sharded, unsharded))
    trainer.model.train()

    for _ in range(2):
        trainer.train_step(batch)
    changed, kinds = {}, {}
    for name, tensor in trainer.model.state_dict().items():
        if ".embedding_bags." not in name or not name.endswith(".weight"):
            continue
        table = name.split(".")[-2]
        rows, dim = tensor.size()
        sharded = isinstance(tensor, ShardedTensor)
        kinds[table] = "sharded" if sharded else "replicated"
        for shard in tensor.local_shards() if sharded else []:  # a table-wise table may live elsewhere
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            start = _table_rows(config.train.seed, table, rows, dim, r0, r0 + nr)[:, c0:c0 + nc]
            changed[f"{table}@{r0}"] = bool((shard.tensor != start).any())
        if not sharded:
            changed[table] = bool((tensor != _table_rows(config.train.seed, table, rows, dim, 0, rows)).any())
    loads, load_rows = [], trainer.reader.load_rows
    trainer.reader.load_rows = lambda day, rows: loads.append([str(day), threading.current_thread().name]) or load_rows(day, rows)
    trainer.train(trainer.train_days[:2])  # one step a day (max_steps_per_day)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"forward_gap": forward_gap, "changed": changed, "kinds": kinds,
                                                           "prefetched": prefetched,
                                                           "first_day": str(trainer.train_days[0]),
                                                           "loads": loads,
                                                           "trained": [str(d) for d in trainer.train_days[:2]]}))
    teardown()


@pytest.fixture(scope="module")
def two_rank_report(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("sharded")
    data = root / "dataset"
    convert.convert(tiny_raw, data, num_stages=2, progress=False)
    rendezvous = RendezvousStore()
    run_ranks(_rank_main, (2, rendezvous.env, str(data), str(root)), nprocs=2)
    return [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]


def test_sharded_forward_equals_unsharded(two_rank_report: list[dict]) -> None:
    for report in two_rank_report:
        assert report["forward_gap"] < 1e-5, report["forward_gap"]


def test_every_rank_updates_its_own_shards(two_rank_report: list[dict]) -> None:
    for rank, report in enumerate(two_rank_report):
        assert report["kinds"]["ranking__video_id"] == "sharded"
        assert report["kinds"]["ranking__author_id"] == "replicated"
        video = {k: v for k, v in report["changed"].items() if k.startswith("ranking__video_id@")}
        assert len(video) == 1, f"rank {rank} holds one row-wise shard of the video table"
        assert all(video.values()), f"rank {rank}'s video rows were not updated"
        assert report["changed"]["ranking__author_id"], "data-parallel tables are updated"
    offsets = [next(k for k in r["changed"] if k.startswith("ranking__video_id@")) for r in two_rank_report]
    assert offsets[0] != offsets[1], "the two ranks hold different row ranges"
    table_wise = [t for t, kind in two_rank_report[0]["kinds"].items() if kind == "sharded" and "video" not in t]
    held = [{t for t in table_wise if any(k == t or k.startswith(f"{t}@") for k in r["changed"])} for r in two_rank_report]
    assert held[0] and held[1] and not held[0] & held[1], "table-wise tables are spread over both ranks"


def test_the_set_up_prefetches_the_first_training_day(two_rank_report: list[dict]) -> None:
    """Each rank's Trainer starts loading its share of the first training day (shuffled, as train()
    reads it) while it builds the model, so the first step does not wait for the day's Parquet."""
    for report in two_rank_report:
        assert report["prefetched"] == [[report["first_day"], True]]


def test_the_train_loop_reads_each_day_from_its_prefetch(two_rank_report: list[dict]) -> None:
    """train() over two days: each day is loaded once, in the background (the first by the set-up's
    prefetch, the second while the first trains), none dropped and read again."""
    for report in two_rank_report:
        assert len(report["trained"]) == 2
        assert [day for day, _ in report["loads"]] in (report["trained"], report["trained"][1:]), report["loads"]
        assert all(thread.startswith("prefetch") for _, thread in report["loads"]), report["loads"]
