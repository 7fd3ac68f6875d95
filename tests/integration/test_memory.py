"""Nothing on the path holds a whole table twice: training a step, checkpointing it and exporting it with
tables of millions of rows grow a fresh process's peak memory by less than 1.5x those tables' bytes.

The same tiny twin runs twice, once with its own vocabularies and once with video_id and author_id
widened to millions of rows (meta.json only: the ids stay valid), sharded row-wise under Adam (weights,
m and v per table). The difference of the two peaks is what the wider tables cost; a full-size
temporary anywhere (set-up, a step, the checkpoint writer, the export) would add one more copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lcron_dist.data import convert

REPO = Path(__file__).resolve().parents[2]
WIDE = {"video_id": 4_000_001, "author_id": 2_000_001}
STAGES, DIM, ADAM_TENSORS = 2, 8, 3  # tiny-2stage: two stages of fp32 tables of width 8; weight, m, v
WITH_PEAK = ("import resource, runpy, sys\n"
             "sys.argv = sys.argv[1:]\n"
             "try:\n    runpy.run_module(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as stop:\n    code = stop.code\nelse:\n    code = 0\n"
             "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"
             "sys.exit(code)\n")
"""Runs a module as `python -m` does, then prints the process's peak RSS."""


def _peak_mib(module: str, *args: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", WITH_PEAK, module, *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(re.search(r"PEAK_RSS_KIB (\d+)", proc.stdout)[1]) / 1024


@pytest.fixture(scope="module")
def peaks(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("memory")
    convert.convert(tiny_raw, root / "narrow", num_stages=2, progress=False)
    shutil.copytree(root / "narrow", root / "wide")
    meta = json.loads((root / "wide" / "meta.json").read_text())
    narrow = {kind: meta["vocab_sizes"][kind] for kind in WIDE}
    meta["vocab_sizes"].update(WIDE)
    (root / "wide" / "meta.json").write_text(json.dumps(meta))
    out = {"extra_weight_mib": STAGES * sum(WIDE[k] - narrow[k] for k in WIDE) * DIM * 4 / 2**20}
    for name in ("narrow", "wide"):
        run = root / f"run-{name}"
        out[name, "train"] = _peak_mib(
            "lcron_dist.train", "--config", "configs/tiny-2stage.toml", f"--data.path={root / name}",
            f"--run.dir={run}", "--run.progress=false", "--parallelism.sharding=row_wise",
            "--parallelism.table_optimizer=adam", "--train.max_steps_per_day=1", "--data.train_days=2024-02-03")
        checkpoint = run / "checkpoints" / "step-1"
        assert checkpoint.is_dir()
        out[name, "export"] = _peak_mib("lcron_dist.serving.export", "--checkpoint", str(checkpoint),
                                        "--out", str(root / f"export-{name}"))
    return out


def test_training_and_checkpointing_wide_tables_hold_no_full_size_copy(peaks: dict) -> None:
    state = ADAM_TENSORS * peaks["extra_weight_mib"]  # the wider tables' weights, m and v: ~1.1 GiB
    grown = peaks["wide", "train"] - peaks["narrow", "train"]
    assert grown < 1.5 * state, f"peak RSS grew by {grown:.0f} MiB for {state:.0f} MiB of tables and optimizer state"
    assert grown > 0.9 * state, "the wide tables were not built"


def test_export_of_wide_tables_holds_no_full_size_copy(peaks: dict) -> None:
    weights = peaks["extra_weight_mib"]  # an export holds the weights only
    grown = peaks["wide", "export"] - peaks["narrow", "export"]
    assert 0.9 * weights < grown < 1.5 * weights, f"peak RSS grew by {grown:.0f} MiB for {weights:.0f} MiB of weights"
