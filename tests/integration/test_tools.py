"""The profiling tools run on the tiny config and write their tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lcron_dist.components.profiling import PHASES
from lcron_dist.data import convert

REPO = Path(__file__).resolve().parents[2]


def _tool(tmp_path: Path, tiny_raw: Path | None, *args: str) -> None:
    """Run a tool script (on a converted tiny twin when `tiny_raw` is given) and require success."""
    extra = []
    if tiny_raw is not None:
        data = tmp_path / "dataset"
        convert.convert(tiny_raw, data, num_stages=2, progress=False)
        extra = [f"--data.path={data}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, *args, *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_profile_throughput_writes_its_phase_table(tiny_raw: Path, tmp_path: Path) -> None:
    _tool(tmp_path, tiny_raw, "tools/profile_throughput.py", "--config", "configs/tiny-2stage.toml", "--steps", "4",
          "--warmup", "1", "--eval-batches", "1", "--out", str(tmp_path / "out"))
    table = (tmp_path / "out" / "throughput.md").read_text()
    for phase in (*PHASES, "step", "batch of 256"):
        assert f"| {phase} |" in table
    assert "training: " in table and "evaluation: " in table and "requests/s" in table


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
