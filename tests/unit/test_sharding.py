"""Sharding choices without a process group: per-table resolution, device checks, planning, table init."""

from __future__ import annotations

import logging

import pytest
import torch

from lcron_dist import plan
from lcron_dist.config import load_config
from lcron_dist.distributed.sharding import (
    CascadeSharder,
    _table_rows,
    build_planner,
    build_sharder,
    check_device_support,
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
    assert table_shardings(config, TABLES, torch.device("cpu")) == {
        "retrieval__video_id": "row_wise", "retrieval__age": "table_wise",
        "ranking__video_id": "column_wise", "ranking__age": "table_wise",
    }
    bad = load_config(None, ["--parallelism.table_sharding.videos=row_wise"])
    with pytest.raises(ValueError, match="unknown table or kind 'videos'"):
        table_shardings(bad, TABLES, torch.device("cpu"))


def test_fused_adam_on_cpu_is_refused_naming_the_table_and_the_way_out() -> None:
    config = load_config(None, ["--parallelism.table_sharding.video_id=row_wise"])  # default optimizer: adam
    shardings = table_shardings(config, TABLES, torch.device("cpu"))
    with pytest.raises(ValueError) as info:
        check_device_support(shardings, config, torch.device("cpu"))
    message = str(info.value)
    assert "table retrieval__video_id" in message and "row_wise" in message
    assert "rowwise_adagrad" in message and "data_parallel" in message
    check_device_support(shardings, config, torch.device("cuda"))  # fbgemm has fused Adam on GPU
    ok = load_config(None, ["--parallelism.table_sharding.video_id=row_wise", "--parallelism.table_optimizer=sgd"])
    check_device_support(table_shardings(ok, TABLES, torch.device("cpu")), ok, torch.device("cpu"))


def test_auto_is_the_best_plan_the_device_runs_with_the_optimizer(caplog: pytest.LogCaptureFixture) -> None:
    adam = load_config(None, ["--parallelism.sharding=auto", "--parallelism.table_sharding.age=table_wise"])
    with caplog.at_level(logging.INFO, logger="lcron_dist"):
        on_cpu = table_shardings(adam, TABLES, torch.device("cpu"))
    # auto -> data-parallel tables stepped by torch's Adam; an explicit sharding is kept (and refused later)
    assert on_cpu == {"retrieval__video_id": "data_parallel", "retrieval__age": "table_wise",
                      "ranking__video_id": "data_parallel", "ranking__age": "table_wise"}
    assert "data_parallel for 2 tables" in caplog.text and "no fused adam on CPU" in caplog.text
    assert table_shardings(adam, TABLES, torch.device("cuda"))["ranking__video_id"] == "auto"  # the planner decides
    adagrad = load_config(None, ["--parallelism.sharding=auto", "--parallelism.table_optimizer=rowwise_adagrad"])
    assert set(table_shardings(adagrad, TABLES, torch.device("cpu")).values()) == {"auto"}  # fused on CPU too


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
    # the paper's recipe (sharding auto, Adam) keeps fused Adam tables on CUDA (on CPU auto means data-parallel)
    assert plan.main(["--config", "configs/recflow-2stage.toml", "--world-size", "2", "--device", "cuda"]) == 0
    assert "| ranking__video_id | 82,216,302 × 8 | row_wise | fused |" in capsys.readouterr().out
    assert plan.main(["--config", "configs/recflow-3stage.toml", "--world-size", "1", "--hbm-gb", "1", "--ddr-gb", "1"]) == 1
    assert "no plan for 1 rank(s)" in capsys.readouterr().out
