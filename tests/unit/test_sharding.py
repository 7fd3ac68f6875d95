"""Sharding choices without a process group: per-table resolution, optimizer checks, planning, table init."""

from __future__ import annotations

import pytest
import torch

from lcron_dist import plan
from lcron_dist.config import load_config
from lcron_dist.distributed.sharding import (
    CascadeSharder,
    _table_rows,
    build_planner,
    build_sharder,
    check_optimizer_support,
    placements,
    table_names,
    table_shardings,
)
from lcron_dist.losses import build_loss
from lcron_dist.models import Cascade

TABLES = ["retrieval__video_id", "retrieval__age", "ranking__video_id", "ranking__age"]


def test_per_table_overrides_win_over_kind_overrides_over_the_default() -> None:
    config = load_config(None, ["--parallelism.sharding=table_wise", "--parallelism.table_sharding.video_id=row_wise",
                                "--parallelism.table_sharding.ranking__video_id=column_wise"])
    assert table_shardings(config, TABLES) == {
        "retrieval__video_id": "row_wise", "retrieval__age": "table_wise",
        "ranking__video_id": "column_wise", "ranking__age": "table_wise",
    }
    bad = load_config(None, ["--parallelism.table_sharding.videos=row_wise"])
    with pytest.raises(ValueError, match="unknown table or kind 'videos'"):
        table_shardings(bad, TABLES)


def test_a_data_parallel_table_without_a_torch_optimizer_is_refused_naming_the_way_out() -> None:
    config = load_config(None, ["--parallelism.sharding=row_wise", "--parallelism.table_sharding.age=data_parallel",
                                "--parallelism.table_optimizer=partial_rowwise_adam"])
    with pytest.raises(ValueError) as info:
        check_optimizer_support(table_shardings(config, TABLES), config)
    message = str(info.value)
    assert "table retrieval__age" in message and "torch has no partial_rowwise_adam" in message
    assert "row_wise" in message and "table_optimizer=adam" in message
    for ok in (["--parallelism.table_sharding.age=table_wise"], ["--parallelism.table_optimizer=adam"]):
        config = load_config(None, ["--parallelism.sharding=row_wise", "--parallelism.table_sharding.age=data_parallel",
                                    "--parallelism.table_optimizer=partial_rowwise_adam", *ok])
        check_optimizer_support(table_shardings(config, TABLES), config)


@pytest.mark.parametrize("optimizer", ["adam", "partial_rowwise_adam"])
def test_auto_on_cpu_is_the_planners_choice_with_the_row_sparse_kernel(optimizer: str) -> None:
    config = load_config("configs/tiny-2stage.toml", ["--parallelism.sharding=auto",
                                                      f"--parallelism.table_optimizer={optimizer}"])
    assert set(table_shardings(config, TABLES).values()) == {"auto"}
    model = Cascade(config.model, plan.recflow_vocab_sizes(100), build_loss("lcron", num_stages=2), device="meta")
    planner = build_planner(model, config, "cpu", 2, slots_per_request=90)
    planner.plan(model, [build_sharder(config)])
    chosen = {p.sharding for p in placements(planner)}
    assert chosen and (optimizer == "adam" or "data_parallel" not in chosen), chosen
    kernels = {p.kernel for p in placements(planner) if p.sharding != "data_parallel"}
    assert kernels == {"fused"}


def test_row_wise_is_offered_on_cpu() -> None:
    types = CascadeSharder().sharding_types("cpu")
    assert {"row_wise", "table_row_wise", "data_parallel", "table_wise"} <= set(types)


def test_table_rows_do_not_depend_on_how_a_table_is_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    import lcron_dist.distributed.sharding as sharding

    monkeypatch.setattr(sharding, "_INIT_BLOCK_ROWS", 7)  # many blocks on a small table
    full = _table_rows(3, "t", 50, 4, 0, 50)
    assert torch.equal(torch.cat([_table_rows(3, "t", 50, 4, a, b) for a, b in ((0, 13), (13, 30), (30, 50))]), full)
    assert full.abs().max() <= 50 ** -0.5
    assert not torch.equal(full, _table_rows(4, "t", 50, 4, 0, 50)), "the seed matters"
    assert not torch.equal(full, _table_rows(3, "u", 50, 4, 0, 50)), "each table has its own rows"
    shard = torch.full((20, 4), float("nan"))[:, 1:3]  # a column-wise shard, filled in place through a view
    sharding._fill_table_rows(shard, 3, "t", 50, 4, 17, column=1)
    assert torch.equal(shard, full[17:37, 1:3])


def test_planner_spreads_full_size_tables_over_gpus() -> None:
    config = load_config("configs/recflow-2stage.toml", ["--parallelism.hbm_gb=80", "--parallelism.local_world_size=4"])
    vocab = plan.recflow_vocab_sizes(device_ids=42_472)
    model = Cascade(config.model, vocab, build_loss("lcron", num_stages=2), device="meta")
    planner = build_planner(model, config, "cuda", 4, slots_per_request=50)
    planner.plan(model, [build_sharder(config)])
    placed = {p.table: p for p in placements(planner)}
    assert set(placed) == set(table_names(model))
    video = placed["ranking__video_id"]
    assert video.rows == 82_216_302 and video.sharding != "data_parallel"
    used = {rank for p in placed.values() for rank in p.ranks}
    assert used == {0, 1, 2, 3}
    # Adam's two moments are counted: a table's bytes exceed its fp32 weights alone.
    assert sum(video.bytes_per_rank.values()) > 2 * 82_216_302 * 8 * 4


def test_lcron_plan_cli_prints_memory_per_rank(capsys: pytest.CaptureFixture) -> None:
    assert plan.main(["--config", "configs/recflow-3stage.toml", "--world-size", "2", "--hbm-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "world size 2 on cuda" in out and "| prerank__video_id | 82,216,302 × 8 |" in out
    assert "| 0 |" in out and "| 1 |" in out
    # the paper's recipe (sharding auto, Adam) keeps fused Adam tables, on CUDA (fbgemm's) and on CPU (ours)
    assert plan.main(["--config", "configs/recflow-2stage.toml", "--world-size", "2", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "| ranking__video_id | 82,216,302 × 8 | row_wise | fused |" in out and "(fbgemm)" in out
    assert plan.main(["--config", "configs/recflow-2stage.toml", "--world-size", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| ranking__video_id | 82,216,302 × 8 | row_wise | fused |" in out
    assert "row-sparse CPU kernel" in out and "weight + m + v = 12 bytes" in out
    assert plan.main(["--config", "configs/recflow-3stage.toml", "--world-size", "1", "--hbm-gb", "1", "--ddr-gb", "1"]) == 1
    assert "no plan for 1 rank(s)" in capsys.readouterr().out
