"""The profiling tools run on the tiny config and write their tables."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from lcron_dist.components.profiling import PHASES
from lcron_dist.config import load_config
from lcron_dist.data import convert
from lcron_dist.losses import build_loss
from lcron_dist.models import Cascade
from lcron_dist.plan import recflow_vocab_sizes

REPO = Path(__file__).resolve().parents[2]


def _tool(tmp_path: Path, tiny_raw: Path | None, *args: str) -> str:
    """Run a tool script (on a converted tiny twin when `tiny_raw` is given), require success, return its stdout."""
    extra = []
    if tiny_raw is not None:
        data = tmp_path / "dataset"
        convert.convert(tiny_raw, data, num_stages=2, progress=False)
        extra = [f"--data.path={data}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, *args, *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_profile_throughput_writes_its_phase_table(tiny_raw: Path, tmp_path: Path) -> None:
    _tool(tmp_path, tiny_raw, "tools/profile_throughput.py", "--config", "configs/tiny-2stage.toml", "--steps", "4",
          "--warmup", "1", "--eval-batches", "1", "--out", str(tmp_path / "out"))
    table = (tmp_path / "out" / "throughput.md").read_text()
    for phase in (*PHASES, "step", "batch of 256"):
        assert f"| {phase} |" in table
    assert "training: " in table and "evaluation: " in table and "requests/s" in table
    summary = json.loads((tmp_path / "out" / "throughput.json").read_text())
    assert summary["step_gflop"] > 0 and 0 < summary["achieved_share_of_peak"] < 1
    rates = summary["matmul_gflop_per_s"]
    assert rates["4096 x 4096 x 4096, aten"] > 0 and rates["4096 x 4096 x 4096, onednn"] > 0, rates
    names = [op["name"] for op in summary["top_operators"]]
    assert "mkldnn::_linear_pointwise" in names, names  # the towers' linear layers (CPU)
    assert "## Roofline" in table and "| top operators" in table


def test_bench_train_compares_a_reference_commit_with_the_tree(tiny_raw: Path, tmp_path: Path) -> None:
    data = tmp_path / "dataset"
    convert.convert(tiny_raw, data, num_stages=2, progress=False)
    out = _tool(tmp_path, None, "tools/bench_train.py", "--ref", "HEAD", "--config", "configs/tiny-2stage.toml",
                "--data", str(data), "--repeats", "1", "--steps", "2", "--out", str(tmp_path / "out"))
    table = (tmp_path / "out" / "bench_train.md").read_text()
    assert "| lcron-train end to end, requests/s |" in table and "| evaluation (profile_throughput), requests/s |" in table
    runs = json.loads((tmp_path / "out" / "bench_train.json").read_text())["runs"]
    assert len(runs["ref"]) == len(runs["ours"]) == 1
    assert runs["ref"][0]["joint_recall"] > 0 and runs["ours"][0]["train_requests_per_s"] > 0
    pair = json.loads((tmp_path / "out" / "bench_train.json").read_text())["pair_ratios"]["eval_requests_per_s"]
    assert pair == [runs["ours"][0]["eval_requests_per_s"] / runs["ref"][0]["eval_requests_per_s"]]
    assert "ours #1" in out and "ref warm-up #1" in out and "ours warm-up #1" in out


def test_bench_train_alternates_which_side_runs_first() -> None:
    sys.path.insert(0, str(REPO / "tools"))
    try:
        from bench_train import pair_order
    finally:
        sys.path.pop(0)
    orders = [pair_order(repeat) for repeat in range(4)]
    assert all(sorted(order) == ["ours", "ref"] for order in orders)
    assert [order[0] for order in orders] == ["ref", "ours", "ref", "ours"]


def test_profile_loss_scaling_writes_table_and_plot(tmp_path: Path) -> None:
    _tool(tmp_path, None, "tools/profile_loss_scaling.py", "--losses", "lcron,bce", "--sizes", "40", "100",
          "--batch-sizes", "8", "--repeats", "1", "--device", "cpu", "--out", str(tmp_path))
    table = (tmp_path / "loss_scaling.md").read_text()
    assert "| lcron | 8 |" in table and "| bce | 8 |" in table and "N=100 ms / MiB" in table
    assert (tmp_path / "loss_scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_methods_writes_the_appendix_d_table(tiny_raw: Path, tmp_path: Path) -> None:
    _tool(tmp_path, tiny_raw, "tools/profile_methods.py", "--config", "configs/tiny-2stage.toml", "--methods",
          "lcron,bce", "--steps", "2", "--warmup", "1", "--out", str(tmp_path / "out"))
    table = (tmp_path / "out" / "methods.md").read_text()
    assert "| lcron |" in table and "| bce |" in table and "time per pass s" in table


def test_profile_memory_writes_table_and_plot(tiny_raw: Path, tmp_path: Path) -> None:
    _tool(tmp_path, tiny_raw, "tools/profile_memory.py", "--config", "configs/tiny-2stage.toml", "--batch-sizes", "16",
          "--candidates", "40", "80", "--out", str(tmp_path / "out"))
    table = (tmp_path / "out" / "memory.md").read_text()
    assert "| 16 | 40 |" in table and "| 16 | 80 |" in table
    assert (tmp_path / "out" / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lcron_plan_states_checkpoint_bytes_per_rank(tmp_path: Path) -> None:
    # Table-wise tables (each whole on one rank) with row-wise Adagrad: fp32 rows × dim plus one float per
    # row; the author_id tables are replicated, so they count once, with the dense weights and 2 Adam moments.
    overrides = ["--parallelism.sharding=table_wise", "--parallelism.table_sharding.author_id=data_parallel",
                 "--parallelism.table_optimizer=rowwise_adagrad"]
    out = _tool(tmp_path, None, "-m", "lcron_dist.plan", "--config", "configs/recflow-2stage.toml", "--world-size",
                "2", "--hbm-gb", "80", *overrides)
    expected, once = {0: 0, 1: 0}, 0
    table_row = r"^\| (\w+__\w+) \| ([\d,]+) × (\d+) \| (\w+) \| \w+ \| ([\d.,]+) \|"
    for name, rows, dim, sharding, ranks in re.findall(table_row, out, re.MULTILINE):
        size = int(rows.replace(",", "")) * (int(dim) * 4 + 4)
        if sharding == "data_parallel":
            once += size
        else:
            assert sharding == "table_wise" and "," not in ranks and ".." not in ranks, name
            expected[int(ranks)] += size
    config = load_config("configs/recflow-2stage.toml", overrides)
    model = Cascade(config.model, recflow_vocab_sizes(42_472), build_loss("lcron", num_stages=2), device="meta")
    once += 3 * 4 * sum(p.numel() for p in model.dense.parameters())
    assert once > 2 * 33_474_012 * 36  # both author_id tables

    section = out.split("checkpoint MiB (own table shards + optimizer state)")[1]
    rank_rows = re.findall(r"^\| (\d+) \| ([\d.,]+) \|$", section, re.MULTILINE)
    printed = {int(rank): float(mib.replace(",", "")) for rank, mib in rank_rows}
    assert printed.keys() == expected.keys() and max(expected.values()) > 2**30
    for rank, size in expected.items():
        assert abs(printed[rank] - size / 2**20) <= 0.05, (rank, printed[rank], size / 2**20)
    written_once, total = (float(x.replace(",", "")) for x in re.findall(r"([\d.,]+) MiB", section.splitlines()[-1]))
    assert abs(written_once - once / 2**20) <= 0.05
    assert abs(total - (once + sum(expected.values())) / 2**20) <= 0.05


def test_bench_scaling_reports_communication_and_the_independent_ceiling(tiny_raw: Path, tmp_path: Path) -> None:
    """The 2-rank job runs as two torchrun agents (--nodes 2), which its ranks report."""
    out = _tool(tmp_path, tiny_raw, "tools/bench_scaling.py", "--configs", "configs/tiny-2stage.toml", "--nprocs", "2",
                "--threads", "1", "--steps", "2", "--warmup", "1", "--profiled-steps", "2", "--repeats", "1",
                "--nodes", "2")
    assert "tiny-2stage.toml × 2 (repeat 1)" in out
    row = next(line for line in out.splitlines() if line.startswith("| tiny-2stage | 2 x 1 (2 nodes) |"))
    cells = [cell.strip() for cell in row.strip("| ").split("|")]
    assert float(cells[5].replace(",", "")) > 0, "two independent one-process jobs ran"
    # The jobs were timed together: each kept training through the other's timed steps.
    assert float(cells[7].rstrip("%")) >= 95.0, row
    shares = [float(share.rstrip("%")) for share in cells[-1].split(" / ")]
    assert len(shares) == 2 and all(0 < share < 100 for share in shares), "each rank's exchange is counted"
    collectives = [line for line in out.splitlines() if line.startswith("| tiny-2stage | 2 |")]
    assert collectives, out
    calls = [float(c) for line in collectives for c in line.split("|")[4].split(" / ")]
    assert all(c >= 0 for c in calls) and max(calls) > 0, collectives


def test_bench_checkpoint_times_saves_and_loads_and_sizes_each_rank(tiny_raw: Path, tmp_path: Path) -> None:
    out = _tool(tmp_path, tiny_raw, "tools/bench_checkpoint.py", "--config", "configs/tiny-2stage.toml",
                "--nprocs", "1", "--steps", "4", "--every-steps", "2", "--repeats", "1", "--warmup", "1",
                "--out", str(tmp_path / "out"))
    assert "| 1 | 0 |" in out and "time in saves / wall" in out
    run = json.loads((tmp_path / "out" / "checkpoint.json").read_text())["runs"][0]
    (rank,) = run["ranks"]
    cost = run["cost"][0]
    assert cost["saves"] == cost["steps"] // 2 >= 2 and 0 < cost["save_share"] < 1
    assert rank["save_s"] > 0 and rank["load_s"] > 0
    assert rank["shard_bytes"] > 1_000_000 and rank["shard_bytes"] + run["shared_bytes"] == run["total_bytes"]


def test_bench_row_sparse_adam_times_every_kernel_at_every_vocabulary(tmp_path: Path) -> None:
    out = _tool(tmp_path, None, "tools/bench_row_sparse_adam.py", "--video-rows", "2000", "30000", "--batch", "16",
                "--rounds", "1")
    for rows in ("2,000 / 666", "30,000 / 10,000"):
        for kernel in ("row-sparse Adam (ours)", "fbgemm fused row-wise Adagrad", "dense + torch Adam"):
            assert re.search(rf"\| {re.escape(rows)} \| {re.escape(kernel)} \| [\d.]+ \| [\d.]+x \|", out), out


def test_bench_collectives_times_each_collective_at_each_size(tmp_path: Path) -> None:
    out = _tool(tmp_path, None, "tools/bench_collectives.py", "--sizes-kib", "4", "256", "--seconds", "0.05")
    assert "2 ranks (gloo" in out
    for kib in ("4", "256"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {kib} |"))
        values = [float(cell) for cell in row.strip("| ").split("|")[1:]]
        assert len(values) == 6 and all(v > 0 for v in values[0::2]), row  # every collective took time
