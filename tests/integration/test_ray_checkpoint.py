"""launch/ray_job.py under a worker failure: Ray Train restarts the workers from the last reported
checkpoint and the run ends with exactly the results of an uninterrupted run.

Both jobs train the tiny twin with 2 gloo workers, a global batch of 32 (7 steps a day) and a
checkpoint every 2 steps. The test kills one Ray Train worker with SIGKILL from outside once Ray has
registered a reported checkpoint (its checkpoint_manager_snapshot.json lists one): Ray restarts the
worker group (--max-failures 1) and the new workers resume from Ray's copy of that checkpoint. Resume
at the same world size on CPU is bit-exact, so the results are compared with ==.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lcron_dist.data import convert, dataset

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 600
ARGS = ["--config", "configs/tiny-2stage.toml", "--num-workers", "2", "--max-failures", "1",
        "--run.progress=false", "--data.batch_size=16", "--checkpoint.every_steps=2"]


def _start(data: Path, run_dir: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RAY_ADDRESS")}
    cmd = [sys.executable, "launch/ray_job.py", *ARGS, f"--data.path={data}", f"--run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, env={**env, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _stop(proc: subprocess.Popen) -> str:
    """Stop a job the test gives up on: Ctrl-C first, so the driver shuts its local Ray down."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=60)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[0]


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"ray_job did not finish within {TIMEOUT_S} s:\n{_stop(proc)[-4000:]}")
    except BaseException:  # e.g. the suite's per-test timeout: leave no job (and no local Ray) behind
        _stop(proc)
        raise
    assert proc.returncode == 0, out[-6000:]
    return out


def _registered_checkpoints(ray_dir: Path) -> int:
    """Checkpoints Ray Train has registered (its snapshot is rewritten at every registration)."""
    try:
        return len(json.loads((ray_dir / "checkpoint_manager_snapshot.json").read_text())["checkpoint_results"])
    except (OSError, ValueError, KeyError):  # not there yet, or caught mid-write
        return 0


def _train_workers(proc: subprocess.Popen) -> list[int]:
    """Pids of this job's Ray Train workers: descendants of the driver (its local Ray's raylet starts them)."""
    import psutil

    pids = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(child.cmdline()):
                pids.append(child.pid)
        except psutil.Error:
            pass
    return pids


def _kill_a_worker_after_a_checkpoint(proc: subprocess.Popen, ray_dir: Path) -> int:
    """SIGKILL one Ray Train worker of the job once Ray has registered a checkpoint; its pid."""
    deadline = time.monotonic() + TIMEOUT_S
    while _registered_checkpoints(ray_dir) == 0:
        if proc.poll() is not None:
            pytest.fail("ray_job ended before Ray registered a checkpoint:\n" + proc.communicate()[0][-4000:])
        if time.monotonic() > deadline:
            pytest.fail(f"no checkpoint registered within {TIMEOUT_S} s:\n" + _stop(proc)[-4000:])
        time.sleep(0.1)
    workers = _train_workers(proc)
    if len(workers) != 2:
        pytest.fail(f"expected 2 Ray Train workers under the driver, found {workers}:\n" + _stop(proc)[-4000:])
    os.kill(workers[-1], signal.SIGKILL)
    return workers[-1]


@pytest.fixture(scope="module")
def runs(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("ray_checkpoint")
    data = root / "dataset"
    convert.convert(tiny_raw, data, num_stages=2, progress=False)
    plain = _finish(_start(data, root / "plain"))
    killed = _start(data, root / "killed")
    try:
        killed_pid = _kill_a_worker_after_a_checkpoint(killed, root / "killed-ray")
    except BaseException:
        if killed.poll() is None:
            _stop(killed)
        raise
    return {"root": root, "data": data, "plain_output": plain, "killed_output": _finish(killed), "killed_pid": killed_pid}


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def test_uninterrupted_job_reports_its_checkpoints_to_ray(runs: dict) -> None:
    root = runs["root"]
    ray_copies = sorted(p for p in (root / "plain-ray").glob("checkpoint_*") if p.is_dir())
    assert len(ray_copies) == 3  # CheckpointConfig(num_to_keep=checkpoint.keep), keep = 3
    newest = json.loads((ray_copies[-1] / "manifest.json").read_text())
    assert newest["run_dir"] == str((root / "plain").resolve())
    meta = dataset.load_meta(runs["data"])
    steps = sum(math.ceil(meta.days[day] / 32) for day in _results(root / "plain")["train_days"])
    assert newest["progress"]["day_done"] and newest["step"] == steps  # the end of the last training day
    assert "resumed from Ray Train's checkpoint" not in runs["plain_output"]


def test_killed_worker_is_restarted_from_the_last_reported_checkpoint(runs: dict) -> None:
    root = runs["root"]
    out = runs["killed_output"]
    assert "resumed from Ray Train's checkpoint" in out, out[-4000:]
    resumed_from = Path(out.split("resumed from Ray Train's checkpoint ", 1)[1].split()[0])
    assert resumed_from.parent.resolve() == (root / "killed-ray").resolve() and resumed_from.name.startswith("checkpoint_")


def test_restarted_job_ends_with_the_uninterrupted_results(runs: dict) -> None:
    plain, killed = _results(runs["root"] / "plain"), _results(runs["root"] / "killed")
    assert plain["world_size"] == killed["world_size"] == 2
    for key in ("joint_recall", "stages", "train_requests", "eval_requests", "train_days", "test_day"):
        assert killed[key] == plain[key], key
