"""`lcron-stream`: the streaming protocol continues training day by day and tests on each day."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from lcron_dist.data import convert, dataset

REPO = Path(__file__).resolve().parents[2]


def _run(module: str, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", module, "--config", "configs/tiny-2stage.toml", "--run.progress=false",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_stream_tests_every_day_after_training_on_the_days_before(tiny_raw: Path, tmp_path: Path) -> None:
    data = tmp_path / "dataset"
    convert.convert(tiny_raw, data, num_stages=2, progress=False)
    days = list(dataset.load_meta(data).days)
    # A recipe's train_days/test_day (here days this dataset lacks) play no part in the streaming protocol.
    _run("lcron_dist.stream", f"--days={days[1]}:{days[2]}", "--methods=lcron,bce", f"--data.path={data}",
         f"--run.dir={tmp_path / 'stream'}", "--data.train_days=2024-01-13:2024-02-03", "--data.test_day=2024-02-04")
    with open(tmp_path / "stream" / "stream.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["day"]) for r in rows] == [(m, d) for m in ("lcron", "bce") for d in days[1:]]
    meta = dataset.load_meta(data)
    for row in rows:
        assert int(row["requests"]) == meta.days[row["day"]], "every test request once"
        trained_days = [d for d in days if d < row["day"]]
        assert int(row["train_requests"]) == sum(meta.days[d] for d in trained_days), "continues, never retrains"
        assert 0.0 < float(row["joint_recall"]) <= 1.0
    assert (tmp_path / "stream" / "stream.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Continuing through day t-1 then testing day t is the same job as training on every day before t.
    _run("lcron_dist.train", f"--data.path={data}", f"--run.dir={tmp_path / 'plain'}")
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    last = next(r for r in rows if r["method"] == "lcron" and r["day"] == days[2])
    assert float(last["joint_recall"]) == plain["joint_recall"]

    # So is the daily warm start: yesterday's finished run, then one more day from its checkpoint.
    _run("lcron_dist.train", f"--data.path={data}", f"--run.dir={tmp_path / 'day0'}", f"--data.train_days={days[0]}",
         f"--data.test_day={days[2]}")
    _run("lcron_dist.train", f"--data.path={data}", f"--run.dir={tmp_path / 'day1'}", f"--data.train_days={days[1]}",
         f"--checkpoint.resume={tmp_path / 'day0' / 'checkpoints'}")
    warm = json.loads((tmp_path / "day1" / "results.json").read_text())
    assert warm["joint_recall"] == plain["joint_recall"] and warm["stages"] == plain["stages"]
    assert warm["train_days"] == [days[1]] and warm["train_requests"] == meta.days[days[1]]


def test_stream_rerun_resumes_after_the_last_completed_day(tiny_raw: Path, tmp_path: Path) -> None:
    data = tmp_path / "dataset"
    convert.convert(tiny_raw, data, num_stages=2, progress=False)
    days = list(dataset.load_meta(data).days)
    args = (f"--days={days[1]}:{days[2]}", f"--data.path={data}", f"--run.dir={tmp_path / 'stream'}")
    _run("lcron_dist.stream", *args)
    checkpoints = tmp_path / "stream" / "lcron" / "checkpoints"
    uninterrupted = (tmp_path / "stream" / "stream.csv").read_text()
    # Stopped after the second training day (the job had tested days[1], not yet days[2]).
    newest = max(checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
    manifest = json.loads((newest / "manifest.json").read_text())
    assert manifest["progress"]["day"] == days[1] and manifest["progress"]["day_done"]
    assert [row["day"] for row in manifest["progress"]["stream_rows"]] == [days[1]]
    (tmp_path / "stream" / "stream.csv").unlink()
    log = _run("lcron_dist.stream", *args)
    assert f"resumed from {newest}" in log
    assert (tmp_path / "stream" / "stream.csv").read_text() == uninterrupted
