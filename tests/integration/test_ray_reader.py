"""`--data.reader=ray`: a local Ray's read tasks give each rank exactly the local reader's batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lcron_dist.data import convert, dataset
from lcron_dist.data.reader import LocalReader

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ray") / "dataset"
    convert.convert(tiny_raw, out, num_stages=2, progress=False)
    return out


def test_ray_reader_gives_every_rank_the_local_batches(data: Path) -> None:
    ray = pytest.importorskip("ray")
    from lcron_dist.data.ray_reader import RayReader

    try:
        meta = dataset.load_meta(data)
        train_day, test_day = meta.day_list[0], meta.day_list[-1]
        seen_train, seen_test = [], []
        for rank in range(2):
            ray_reader = RayReader(data, 32, rank, 2, seed=4, num_cpus=4, object_store_mb=128)
            local = LocalReader(data, 32, rank, 2, seed=4)
            ray_reader.prefetch(test_day, shuffle=False)  # streams in while the training day is read
            ray_train = [b.request_id.tolist() for b in ray_reader.iter_day(train_day, shuffle=True)]
            assert ray_train == [b.request_id.tolist() for b in local.iter_day(train_day, shuffle=True)]
            ray_test = [b for b in ray_reader.iter_day(test_day, shuffle=False)]
            local_test = list(local.iter_day(test_day, shuffle=False))
            assert all(a.request_id.equal(b.request_id) and a.item.equal(b.item) and a.history.equal(b.history)
                       for a, b in zip(ray_test, local_test))
            seen_train += [r for batch in ray_train for r in batch]
            seen_test += [r for batch in ray_test for r in batch.request_id.tolist()]
        # Across the two ranks: every request of the day once, in training and in evaluation.
        assert sorted(seen_train) == sorted(set(seen_train)) and len(seen_train) == meta.days[str(train_day)]
        assert sorted(seen_test) == sorted(set(seen_test)) and len(seen_test) == meta.days[str(test_day)]
    finally:
        ray.shutdown()


def test_training_with_the_ray_reader(data: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "lcron_dist.train", "--config", "configs/tiny-2stage.toml", f"--data.path={data}",
           f"--run.dir={tmp_path}", "--run.progress=false", "--data.reader=ray", "--ray.object_store_mb=128"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    meta = dataset.load_meta(data)
    assert results["eval_requests"] == meta.days[results["test_day"]]
    assert results["train_requests"] == sum(meta.days[d] for d in results["train_days"])


def test_ray_cluster_job_with_two_workers(data: Path, tmp_path: Path) -> None:
    """launch/ray_job.py: the Trainer under Ray Train (2 gloo workers) on a local Ray, Ray Data reading."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")}
    cmd = [sys.executable, "launch/ray_job.py", "--config", "configs/tiny-2stage.toml", "--num-workers", "2",
           f"--data.path={data}", f"--run.dir={tmp_path / 'run'}", "--run.progress=false"]
    proc = subprocess.run(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    meta = dataset.load_meta(data)
    assert results["world_size"] == 2
    assert results["eval_requests"] == meta.days[results["test_day"]]
    assert results["train_requests"] == sum(meta.days[d] for d in results["train_days"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["reader"] == "ray"
