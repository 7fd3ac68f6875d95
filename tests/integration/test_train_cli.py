"""`lcron-train` end to end on the tiny twin: the real CLI, TorchRec DMP and DeepSpeed, in one process."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lcron_dist.data import convert, dataset, schema

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_datasets(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("train-data")
    out = {}
    for stages in (2, 3):
        out[stages] = root / f"dataset-{stages}stage"
        convert.convert(tiny_raw, out[stages], num_stages=stages, progress=False)
    return out


def _train(config: str, data: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "lcron_dist.train", "--config", str(REPO / "configs" / config),
           f"--data.path={data}", f"--run.dir={run_dir}", "--run.progress=false", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("method", ["lcron", "bce"])
def test_train_writes_results(stages: int, method: str, tiny_datasets: dict[int, Path], tmp_path: Path) -> None:
    data = tiny_datasets[stages]
    proc = _train(f"tiny-{stages}stage.toml", data, tmp_path, f"--loss.name={method}", "--train.seed=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    meta = dataset.load_meta(data)
    days = list(meta.days)
    assert results["method"] == method and results["num_stages"] == stages and results["seed"] == 3
    assert results["test_day"] == days[-1]
    assert set(results["stages"]) == set(schema.STAGE_NAMES[stages])
    for values in results["stages"].values():
        assert 0.0 <= values["recall"] <= 1.0 and 0.0 <= values["ndcg@10"] <= 1.0
    assert 0.0 < results["joint_recall"] <= 1.0
    assert results["train_requests"] == sum(meta.days[d] for d in days[:-1]), "every training request once"
    assert results["eval_requests"] == meta.days[days[-1]], "every test request once, no dropped last batch"
    assert results["train_requests_per_s"] > 0

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows and all("loss" in r and "requests_per_s" in r for r in rows)
    if method == "lcron":
        assert {"e2e", *(f"single/{s}" for s in schema.STAGE_NAMES[stages])} <= set(rows[0])
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["loss"]["name"] == method and resolved["data"]["path"] == str(data)
    assert "data_parallel" in (tmp_path / "plan.md").read_text()


def test_bad_override_is_rejected_before_training(tiny_datasets: dict[int, Path], tmp_path: Path) -> None:
    proc = _train("tiny-2stage.toml", tiny_datasets[2], tmp_path, "--data.batch_size=0")
    assert proc.returncode != 0
    assert "data.batch_size must be >= 1" in proc.stderr
    proc = _train("tiny-3stage.toml", tiny_datasets[2], tmp_path)
    assert proc.returncode != 0 and "converted for 2 stages" in proc.stderr


def test_diverging_run_stops_at_the_first_non_finite_loss(tiny_datasets: dict[int, Path], tmp_path: Path) -> None:
    """lr=1e5 makes the loss NaN after a few steps (step 6, on the second day): the run exits 3 naming the
    step, day and batch and the newest of several checkpoints, metrics.jsonl holds only finite JSON rows,
    no checkpoint is of that step or later, and a restart resumes from the last checkpoint and stops at
    the same step."""
    args = ("--optim.lr=1e5", "--run.log_every=1", "--checkpoint.every_steps=1")
    proc = _train("tiny-2stage.toml", tiny_datasets[2], tmp_path, *args)
    assert proc.returncode == 3, proc.stderr[-3000:]
    found = re.search(r"lcron-train: error: the loss is not finite on rank 0 at step (\d+) \(day (\S+), global batch "
                      r"(\d+)\).* a restart resumes from (\S+)step-(\d+)$", proc.stderr, re.MULTILINE)
    assert found, proc.stderr[-3000:]
    step, last_good = int(found[1]), int(found[5])
    assert step > 3 and last_good == step - 1  # several checkpoints: the newest is named
    rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
            for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step)) and all(math.isfinite(r["loss"]) for r in rows)
    assert max(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoints").glob("step-*")) == step - 1
    assert not (tmp_path / "results.json").exists()

    again = _train("tiny-2stage.toml", tiny_datasets[2], tmp_path, *args)
    assert again.returncode == 3 and f"step-{step - 1} (step {step - 1}," in again.stderr, again.stderr[-3000:]
    assert f"at step {step} (day {found[2]}, global batch {found[3]})" in again.stderr
