"""Serving export end to end on the tiny twin: lcron-train -> lcron-export -> lcron-score.

Two runs are trained once for the module: a 2-stage run on 2 ranks with sharded tables (row-wise
video_id, data-parallel author_id, table-wise others) and a 3-stage run on 1 rank. Each is exported and
scored on its test day, which must reproduce the trainer's evaluation (results.json) to 1e-6. The CLIs
run as subprocesses once each (and for the fresh-process check); the other exports and scores call the
same functions in this process, to keep the module's runtime small.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lcron_dist.components.checkpoint import checkpoint_steps
from lcron_dist.data import convert, schema
from lcron_dist.distributed.process_group import RendezvousStore
from lcron_dist.serving import export as export_cli
from lcron_dist.serving import score as score_cli

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TIMEOUT_S = 300
SHARDED = ["--parallelism.sharding=table_wise", "--parallelism.table_sharding.video_id=row_wise",
           "--parallelism.table_sharding.author_id=data_parallel", "--parallelism.table_optimizer=rowwise_adagrad"]
LATENCY_REQUESTS = 20


def _run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run(cmd, capture_output=True, text=True, env={**environ, "OMP_NUM_THREADS": "1", **env},
                          timeout=TIMEOUT_S, cwd=REPO)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc


def _train(run_dir: Path, data: Path, stages: int, nproc: int, *overrides: str) -> dict:
    """Train the tiny recipe; returns the run's newest checkpoint, its results.json and its dataset."""
    args = [f"--data.path={data}", f"--run.dir={run_dir}", "--run.progress=false", *overrides]
    if nproc == 1:
        _ok(_run([sys.executable, "-m", "lcron_dist.train", "--config", f"configs/tiny-{stages}stage.toml", *args]))
    else:
        rendezvous = RendezvousStore()  # serves the endpoint until the launch is done
        _ok(_run(["bash", "launch/run_train.sh", *args], CONFIG=f"configs/tiny-{stages}stage.toml",
                 PYTHON=sys.executable, NPROC_PER_NODE=str(nproc), **rendezvous.env))
    (_, checkpoint), *_ = checkpoint_steps(run_dir / "checkpoints")
    return {"checkpoint": checkpoint, "results": json.loads((run_dir / "results.json").read_text()), "data": data}


def _export_cli(checkpoint: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([str(BIN / "lcron-export"), "--checkpoint", str(checkpoint), "--out", str(out), *args])


@pytest.fixture(scope="module")
def runs(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("serving")
    data = {stages: root / f"dataset-{stages}stage" for stages in (2, 3)}
    for stages, path in data.items():
        convert.convert(tiny_raw, path, num_stages=stages, progress=False)
    return {"2stage": _train(root / "run-2stage", data[2], 2, 2, *SHARDED, "--data.batch_size=32"),
            "3stage": _train(root / "run-3stage", data[3], 3, 1)}


@pytest.fixture(scope="module")
def exports(runs: dict[str, dict], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    out = {name: root / name for name in ("2stage", "2stage-int8", "3stage")}
    # The CLI, on a run's checkpoints/ folder (its newest complete checkpoint).
    _ok(_export_cli(runs["2stage"]["checkpoint"].parent, out["2stage"]))
    export_cli.export(runs["2stage"]["checkpoint"], out["2stage-int8"], dtype="int8")
    export_cli.export(runs["3stage"]["checkpoint"], out["3stage"])
    return out


def _assert_trainer_metrics(report: dict, results: dict) -> None:
    assert report["requests"] == results["eval_requests"]
    assert report["joint_recall"] == pytest.approx(results["joint_recall"], abs=1e-6)
    for stage, values in results["stages"].items():
        for metric, value in values.items():
            assert report["stages"][stage][metric] == pytest.approx(value, abs=1e-6), (stage, metric)


def _assert_serving(report: dict) -> None:
    assert report["not_indexed_candidates"] == 0
    serving = report["serving"]
    assert serving["latency"]["requests"] == LATENCY_REQUESTS
    assert 0 < serving["latency"]["p50_ms"] <= serving["latency"]["p99_ms"]
    assert serving["throughput"]["batch"] == 64 and serving["throughput"]["requests_per_s"] > 0
    # The funnel (top-k, no random tie-break) keeps the same items unless scores tie at a quota.
    assert serving["throughput"]["joint_recall"] == pytest.approx(report["joint_recall"], abs=0.02)


def test_sharded_two_rank_checkpoint_exports_and_scores_like_the_trainer(runs: dict, exports: dict, tmp_path: Path) -> None:
    run = runs["2stage"]
    manifest = json.loads((exports["2stage"] / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"] == str(run["checkpoint"].resolve())
    assert manifest["source"]["world_size"] == 2 and manifest["evaluation"]["world_size"] == 2
    assert manifest["source"]["sharding"]["retrieval__video_id"] == "row_wise"
    assert manifest["source"]["sharding"]["ranking__author_id"] == "data_parallel"
    assert manifest["stages"] == ["retrieval", "ranking"] and manifest["quotas"] == [30, 20]
    assert set(manifest["programs"]) == {"retrieval_user", "ranking"}
    assert manifest["inputs"]["item"] == list(schema.ITEM_FEATURES) and manifest["dtype"] == "fp32"
    out = tmp_path / "score.json"
    _ok(_run([str(BIN / "lcron-score"), "--export", str(exports["2stage"]), "--data", str(run["data"]),
              "--day", run["results"]["test_day"], f"--latency-requests={LATENCY_REQUESTS}", "--out", str(out)]))
    report = json.loads(out.read_text())
    _assert_trainer_metrics(report, run["results"])
    _assert_serving(report)


def test_three_stage_export_scores_like_the_trainer(runs: dict, exports: dict) -> None:
    run = runs["3stage"]
    manifest = json.loads((exports["3stage"] / "manifest.json").read_text())
    assert manifest["quotas"] == [40, 30, 20] and set(manifest["programs"]) == {"retrieval_user", "prerank", "ranking"}
    report = score_cli.score(exports["3stage"], run["data"], schema.parse_day(run["results"]["test_day"]),
                             latency_requests=LATENCY_REQUESTS)
    _assert_trainer_metrics(report, run["results"])
    _assert_serving(report)


def test_int8_export_reports_difference_and_size(runs: dict, exports: dict) -> None:
    run = runs["2stage"]
    report = score_cli.score(exports["2stage-int8"], run["data"], schema.parse_day(run["results"]["test_day"]),
                             latency_requests=LATENCY_REQUESTS, reference=exports["2stage"])
    assert report["dtype"] == "int8"
    # dim 8: 8 int8 bytes + fp16 scale and bias per row, aligned to 16 bytes, against 32 bytes of fp32.
    assert report["bytes"]["exported"] <= 0.55 * report["bytes"]["fp32"]
    reference = report["reference"]
    assert reference["dtype"] == "fp32"
    assert reference["joint_recall"] == pytest.approx(run["results"]["joint_recall"], abs=1e-6)
    assert reference["joint_recall_difference"] == pytest.approx(report["joint_recall"] - reference["joint_recall"])
    assert abs(reference["joint_recall_difference"]) < 0.05
    assert all(0 < d < 0.1 for d in reference["max_abs_score_difference"].values()), "quantized, yet close"
    assert reference["export_reduction"] > 0.15


FRESH_PROCESS = """
import json, sys
from pathlib import Path
import torch
import fbgemm_gpu  # registers the fbgemm ops
shapes = {}
for root in map(Path, sys.argv[1:]):
    manifest = json.loads((root / "manifest.json").read_text())
    # more candidates than history positions and than training's N (the programs' N is symbolic)
    b, n, width = 2, manifest["seq_len"] + 5, {k: len(v) for k, v in manifest["inputs"].items()}
    user = torch.ones(b, width["user"], dtype=torch.int64)
    item = torch.ones(b, n, width["item"], dtype=torch.int64)
    history = torch.ones(b, manifest["seq_len"], width["history"], dtype=torch.int64)
    for name, file in manifest["programs"].items():
        program = torch.export.load(root / file).module()
        out = program(user, history) if name == "retrieval_user" else program(user, item, history)
        assert torch.isfinite(out).all(), (root, name)
        shapes[f"{root.name}/{name}"] = list(out.shape)
loaded = sorted({m.split(".")[0] for m in sys.modules} & {"lcron_dist", "torchrec", "deepspeed", "ray"})
print(json.dumps({"shapes": shapes, "training_stack": loaded}))
"""


def test_programs_load_with_torch_and_fbgemm_only(exports: dict[str, Path], tmp_path: Path) -> None:
    copies = []
    for name in ("3stage", "2stage-int8"):  # copied: nothing may refer back to the run or the checkpoint
        copies.append(tmp_path / name)
        shutil.copytree(exports[name], copies[-1])
    proc = _ok(_run([sys.executable, "-c", FRESH_PROCESS, *map(str, copies)]))
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["training_stack"] == []
    hidden = {name: json.loads((exports[name] / "manifest.json").read_text()) for name in ("3stage", "2stage-int8")}
    n = hidden["3stage"]["seq_len"] + 5
    assert hidden["2stage-int8"]["seq_len"] + 5 == n
    assert out["shapes"] == {
        "3stage/retrieval_user": [2, 16], "3stage/prerank": [2, n], "3stage/ranking": [2, n],
        "2stage-int8/retrieval_user": [2, 16], "2stage-int8/ranking": [2, n]}, hidden


def test_missing_or_incomplete_checkpoint_is_named(runs: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def refused(checkpoint: Path) -> str:
        assert export_cli.main(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 2
        return capsys.readouterr().err

    missing = tmp_path / "run" / "checkpoints" / "step-9"
    assert f"checkpoint {missing} does not exist" in refused(missing)
    incomplete = tmp_path / "step-copy"
    shutil.copytree(runs["2stage"]["checkpoint"], incomplete)
    shard = sorted(incomplete.glob("*.distcp"))[0]
    shard.unlink()
    assert f"{shard} is missing" in refused(incomplete)
    (incomplete / "manifest.json").unlink()
    assert f"{incomplete / 'manifest.json'} is missing" in refused(incomplete)
    assert not (tmp_path / "out").exists()


def test_dataset_or_export_that_does_not_fit_is_named(runs: dict, exports: dict, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    def refused(data: Path, export: Path = exports["2stage"]) -> str:
        day = runs["2stage"]["results"]["test_day"]
        assert score_cli.main(["--export", str(export), "--data", str(data), "--day", day]) == 2
        return capsys.readouterr().err

    data = tmp_path / "dataset"
    shutil.copytree(runs["2stage"]["data"], data)
    meta = json.loads((data / "meta.json").read_text())
    meta["vocab_sizes"]["author_id"] += 1
    (data / "meta.json").write_text(json.dumps(meta))
    err = refused(data)
    assert f"file {data / 'meta.json'}" in err and "column author_id" in err and "vocabulary of author_id" in err
    assert str(exports["2stage"] / "manifest.json") in err
    assert "converted for 3 stages" in refused(runs["3stage"]["data"])
    partial = tmp_path / "export"
    shutil.copytree(exports["2stage"], partial)
    (partial / "ranking.pt2").unlink()
    assert f"{partial / 'ranking.pt2'}" in refused(runs["2stage"]["data"], partial)
    assert f"{tmp_path / 'none' / 'manifest.json'} is missing" in refused(runs["2stage"]["data"], tmp_path / "none")


def test_bench_serving_compares_exports(runs: dict, exports: dict, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = _ok(_run([sys.executable, "tools/bench_serving.py", "--exports", str(exports["2stage"]),
                     str(exports["2stage-int8"]), "--data", str(runs["2stage"]["data"]),
                     "--day", runs["2stage"]["results"]["test_day"], "--latency-requests=10",
                     "--throughput-requests=128", "--out", str(out)]))
    rows = json.loads(out.read_text())
    assert [row["dtype"] for row in rows] == ["fp32", "int8"]
    assert all(0 < row["p50_ms"] <= row["p99_ms"] and row["requests_per_s"] > 0 for row in rows)
    assert rows[1]["table_mib"] < rows[0]["table_mib"]
    assert "| export | dtype |" in proc.stdout
