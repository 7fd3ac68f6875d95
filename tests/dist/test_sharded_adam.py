"""Row-sparse Adam on sharded tables: 2 gloo ranks train step by step as 1 rank does, for every sharding type.

One spawned job per world size builds a Trainer per sharding type in turn and trains the first day's first
global batches (64 requests: 2 ranks x 32 or 1 x 64); the logged losses are the global batch's mean.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lcron_dist.data import convert
from lcron_dist.distributed.process_group import RendezvousStore
from ranks import run_ranks  # tests/ is on sys.path (conftest.py's folder)

SHARDINGS = ("table_wise", "row_wise", "column_wise", "table_row_wise")
STEPS = 4
TIMEOUT_S = 300


def _rank_main(rank: int, world: int, rendezvous: dict, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", **rendezvous)
    from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbeddingBag
    from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

    from lcron_dist.config import load_config
    from lcron_dist.distributed.process_group import teardown
    from lcron_dist.trainer import Trainer

    kernels = {}
    for sharding in SHARDINGS:
        run = Path(out, f"world{world}", sharding)
        config = load_config("configs/tiny-2stage.toml", [
            f"--data.path={data}", f"--run.dir={run}", f"--parallelism.sharding={sharding}",
            "--parallelism.table_optimizer=adam", f"--data.batch_size={64 // world}", "--run.log_every=1",
            f"--train.max_steps_per_day={STEPS}", "--checkpoint.at_day_end=false", "--run.progress=false"])
        trainer = Trainer(config)
        lookups = [lookup for m in trainer.model.modules() if isinstance(m, ShardedEmbeddingBagCollection)
                   for lookup in m._lookups]  # noqa: SLF001 (TorchRec keeps them in a plain list)
        kernels[sharding] = sorted({type(m._emb_module).__name__ for lookup in lookups for m in lookup.modules()
                                    if isinstance(m, BatchedFusedEmbeddingBag)})
        trainer.train(trainer.train_days[:1])
    Path(out, f"world{world}-rank{rank}.json").write_text(json.dumps(kernels))
    teardown()


def _job(world: int, data: Path, out: Path) -> dict:
    rendezvous = RendezvousStore()
    run_ranks(_rank_main, (world, rendezvous.env, str(data), str(out)), nprocs=world, timeout_s=TIMEOUT_S)
    losses = {}
    for sharding in SHARDINGS:
        rows = [json.loads(line) for line in (out / f"world{world}" / sharding / "metrics.jsonl").read_text().splitlines()]
        losses[sharding] = [(row["step"], row["loss"]) for row in rows]
    kernels = [json.loads((out / f"world{world}-rank{r}.json").read_text()) for r in range(world)]
    return {"losses": losses, "kernels": kernels}


@pytest.fixture(scope="module")
def runs(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("row-sparse-adam")
    data = root / "dataset"
    convert.convert(tiny_raw, data, num_stages=2, progress=False)
    return {world: _job(world, data, root) for world in (2, 1)}


def test_sharded_tables_train_with_the_row_sparse_kernel(runs: dict) -> None:
    for world, job in runs.items():
        for rank, kernels in enumerate(job["kernels"]):
            for sharding in SHARDINGS:
                assert kernels[sharding] == ["RowSparseAdamEmbeddingBags"], (world, rank, sharding)


@pytest.mark.parametrize("sharding", SHARDINGS)
def test_two_ranks_equal_one_rank_step_by_step(runs: dict, sharding: str) -> None:
    two, one = runs[2]["losses"][sharding], runs[1]["losses"][sharding]
    assert [s for s, _ in two] == [s for s, _ in one] == list(range(1, STEPS + 1))
    for (step, a), (_, b) in zip(two, one):
        assert a == pytest.approx(b, rel=1e-5), f"step {step}"
    assert two[-1][1] != two[0][1], "the tables and towers train"
