"""Profiling hooks: on and off give the same training; the trace is Chrome-trace JSON of the phases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lcron_dist.components.profiling import PHASES
from lcron_dist.data import convert

REPO = Path(__file__).resolve().parents[2]


def _train(data: Path, run_dir: Path, *overrides: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "lcron_dist.train", "--config", "configs/tiny-2stage.toml", f"--data.path={data}",
           f"--run.dir={run_dir}", "--run.progress=false", "--run.log_every=2", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_profiling_on_and_off(tiny_raw: Path, tmp_path: Path) -> None:
    data = tmp_path / "dataset"
    convert.convert(tiny_raw, data, num_stages=2, progress=False)
    off = _train(data, tmp_path / "off")
    on = _train(data, tmp_path / "on", "--profiling.enable_profiling=true", "--profiling.profile_start_step=2",
                "--profiling.profile_steps=2", "--profiling.enable_memory_snapshot=true", "--run.tensorboard=true")
    assert [r["loss"] for r in on] == [r["loss"] for r in off], "profiling must not change training"
    for row in on + off:
        shares = {k: v for k, v in row.items() if k.startswith("share/")}
        assert set(shares) == {f"share/{p}" for p in PHASES}
        assert sum(shares.values()) == pytest.approx(1.0)
        assert row["peak_rss_mib/rank0"] > 100
    traces = list((tmp_path / "on" / "traces").glob("rank0-*.json"))
    assert len(traces) == 1 and not (tmp_path / "off" / "traces").exists()
    events = json.loads(traces[0].read_text())["traceEvents"]
    names = {e.get("name") for e in events}
    assert {f"lcron/{p}" for p in PHASES} | {"lcron/embedding", "lcron/towers", "lcron/loss"} <= names
    board = list((tmp_path / "on" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(board) == 1 and board[0].stat().st_size > 0
