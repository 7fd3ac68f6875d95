"""TorchRec's train pipeline trains exactly what the plain loop trains, at 1 and 2 ranks.

The tables mix every kind the trainer shards: video_id row-wise, author_id data-parallel, the rest
table-wise, under row-sparse Adam and torch's Adam. A global batch of 48 x ranks does not divide the
tiny twin's 200-request days, so each day ends with a partial global batch, which the pipeline (holding
the next batches in flight) must still train.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_checkpoint import SHARDED, _run  # tests/dist is on sys.path (pytest prepends the test folder)

BATCH = 48
DAY_REQUESTS = 200  # the tiny twin's requests per day
OVERRIDES = ["--run.progress=false", "--run.log_every=1", "--checkpoint.at_day_end=false", *SHARDED,
             f"--data.batch_size={BATCH}"]


@pytest.fixture(scope="module")
def runs(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from lcron_dist.data import convert

    root = tmp_path_factory.mktemp("pipeline")
    data = root / "dataset"
    convert.convert(tiny_raw, data, num_stages=2, progress=False)
    out = {}
    for ranks in (1, 2):
        for pipeline in ("true", "false"):
            run_dir = root / f"{ranks}-{pipeline}"
            log = _run(run_dir, data, ranks, *OVERRIDES, f"--train.pipeline={pipeline}")
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            out[ranks, pipeline == "true"] = {"log": log, "rows": rows,
                                              "results": json.loads((run_dir / "results.json").read_text())}
    return out


def _close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


@pytest.mark.parametrize("ranks", [1, 2])
def test_pipelined_steps_equal_the_plain_loop(runs: dict, ranks: int) -> None:
    pipelined, plain = runs[ranks, True], runs[ranks, False]
    assert "train pipeline: TorchRec's TrainPipelineSparseDist" in pipelined["log"]
    assert "train pipeline: none" in plain["log"]
    steps = [(r["step"], r["day"]) for r in plain["rows"]]
    assert [(r["step"], r["day"]) for r in pipelined["rows"]] == steps
    for a, b in zip(pipelined["rows"], plain["rows"]):
        for key in ("loss", "e2e", "single/retrieval", "single/ranking"):
            assert _close(a[key], b[key]), (a["step"], key, a[key], b[key])
    assert any(r["share/input_dist"] > 0 for r in pipelined["rows"])  # the phase of the pipeline's own work
    assert not any("share/input_dist" in r for r in plain["rows"])
    got, want = pipelined["results"], plain["results"]
    assert _close(got["joint_recall"], want["joint_recall"])
    for stage, metrics in want["stages"].items():
        for name, value in metrics.items():
            assert _close(got["stages"][stage][name], value), (stage, name)


@pytest.mark.parametrize("ranks", [1, 2])
def test_the_last_partial_global_batch_of_a_day_is_trained(runs: dict, ranks: int) -> None:
    """Every request of both days trains once: ceil(200 / global batch) steps a day, the last one short."""
    run = runs[ranks, True]
    days = sorted({r["day"] for r in run["rows"]})
    per_day = -(-DAY_REQUESTS // (BATCH * ranks))
    assert DAY_REQUESTS % (BATCH * ranks) != 0
    assert [sum(r["day"] == d for r in run["rows"]) for d in days] == [per_day] * len(days)
    assert run["results"]["train_requests"] == DAY_REQUESTS * len(days)

