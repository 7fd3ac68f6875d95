"""Checkpoints across real launches: exact resume, resharding 2 <-> 1 ranks, a rank killed under torchrun,
bad checkpoints, a crash in the middle of a save.

Runs share the tiny twin: 2 training days of 200 requests; a global batch of 64 (2 ranks x 32 or 1 x 64)
gives 4 steps a day, and checkpoints every 3 steps put one in the middle of the first day (step 3).
"Rewinding" a finished run deletes its checkpoints after step 3 and its results, as if it had been
stopped there; the re-launch then resumes from step 3.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lcron_dist.data import convert
from lcron_dist.distributed.process_group import RendezvousStore
from ranks import run_ranks  # tests/ is on sys.path (conftest.py's folder)

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240
LOGGED = ["--run.progress=false", "--run.log_every=1"]
EVERY_3 = [*LOGGED, "--checkpoint.every_steps=3", "--checkpoint.keep=100"]
SHARDED = ["--parallelism.sharding=table_wise", "--parallelism.table_sharding.video_id=row_wise",
           "--parallelism.table_sharding.author_id=data_parallel", "--parallelism.table_optimizer=adam"]
"""Sharded tables with row-sparse Adam (fused), the author tables data-parallel with torch's Adam."""
DAMAGES = ("missing_shard", "no_manifest", "truncated", "altered", "manifest_not_json", "manifest_without_files",
           "manifest_of_another_format")
DAMAGE_MESSAGES = {"missing_shard": "is missing", "no_manifest": "is not a complete checkpoint",
                   "truncated": "is truncated or altered", "altered": "is altered: its CRC-32 is",
                   "manifest_not_json": "is damaged (JSONDecodeError", "manifest_without_files": "is damaged (KeyError",
                   "manifest_of_another_format": "checkpoint format 2, this lcron_dist reads format 3"}
"""What the refusal of an explicitly named damaged checkpoint says, per damage."""
METRICS = ("joint_recall", "stages", "train_requests", "eval_requests", "train_days", "test_day")


def _launch(run_dir: Path, data: Path, nproc: int, *overrides: str, **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    rendezvous = RendezvousStore()
    environ.update(CONFIG="configs/tiny-2stage.toml", PYTHON=sys.executable, NPROC_PER_NODE=str(nproc),
                   **rendezvous.env, **env)
    cmd = ["bash", "launch/run_train.sh", f"--data.path={data}", f"--run.dir={run_dir}", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.rendezvous = rendezvous  # the endpoint is served by this process until the launch is collected
    return proc


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [d for c in children for d in _descendants(c)]


def _finish(proc: subprocess.Popen) -> str:
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for pid in [proc.pid, *_descendants(proc.pid)]:  # torchrun's workers leave its process group
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"launch hung for {TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-4000:]
    return out


def _run(run_dir: Path, data: Path, nproc: int, *overrides: str) -> str:
    return _finish(_launch(run_dir, data, nproc, *overrides))


def _outcome(run_dir: Path) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"results": {k: results[k] for k in METRICS}, "losses": [(r["step"], r["loss"]) for r in rows]}


def _rewind(run_dir: Path, step: int) -> dict:
    """The finished run's outcome; then its state as if it had stopped right after checkpoint `step`."""
    outcome = _outcome(run_dir)
    for path in (run_dir / "checkpoints").glob("step-*"):
        if int(path.name.split("-")[1]) > step:
            shutil.rmtree(path)
    (run_dir / "results.json").unlink()
    return outcome


def _reload_and_save(rank: int, world: int, rendezvous: dict, data: str, checkpoint: str, out: str, overrides: list) -> None:
    """Load `checkpoint` at world size `world`, then save what was loaded into `out` (gathering it via DCP)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", **rendezvous)
    from lcron_dist.config import load_config
    from lcron_dist.distributed.process_group import teardown
    from lcron_dist.trainer import Trainer

    config = load_config("configs/tiny-2stage.toml", [f"--data.path={data}", f"--run.dir={out}/run", *LOGGED,
                                                      f"--checkpoint.resume={checkpoint}", f"--checkpoint.dir={out}",
                                                      *overrides])
    Trainer(config).save_checkpoint()
    teardown()


def _consolidated(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, whole, by flattened key."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = scratch / f"{checkpoint.parent.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(target))

    def flatten(value, prefix: str) -> dict:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flatten(item, f"{prefix}/{key}").items()}
        return {prefix: value} if torch.is_tensor(value) else {}

    return flatten(torch.load(target, weights_only=False), "")


@pytest.fixture(scope="module")
def dataset(tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("checkpoint-data") / "dataset"
    convert.convert(tiny_raw, data, num_stages=2, progress=False)
    return data


@pytest.fixture(scope="module")
def jobs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("checkpoint")
    data = dataset
    out: dict = {"data": data, "root": root}

    # 2 ranks x 32, sharded and data-parallel tables (row-sparse Adam fused, torch's dense Adam), ZeRO-1.
    two = root / "two"
    two_args = [*EVERY_3, *SHARDED, "--parallelism.zero_stage=1"]
    _run(two, data, 2, *two_args, "--data.batch_size=32")
    out["two"] = _rewind(two, 3)
    out["two_resumed_log"] = _run(two, data, 2, *two_args, "--data.batch_size=32")
    out["two_resumed"] = _rewind(two, 3)
    _run(two, data, 1, *two_args, "--data.batch_size=64")  # 2 -> 1 rank, same global batch
    out["two_to_one"] = _outcome(two)

    # 1 rank x 64, the same tables with ZeRO-0; then continued on 2 ranks x 32 with ZeRO-3.
    one = root / "one"
    one_args = [*EVERY_3, *SHARDED, "--parallelism.zero_stage=0"]
    _run(one, data, 1, *one_args, "--data.batch_size=64")
    for step in (3, 4):
        shutil.copytree(one / "checkpoints" / f"step-{step}", root / "saved-by-one" / f"step-{step}")
    out["one"] = _rewind(one, 3)
    zero3 = [a.replace("zero_stage=0", "zero_stage=3") for a in one_args]
    _run(one, data, 2, *zero3, "--data.batch_size=32")  # 1 -> 2 ranks, ZeRO-0 -> ZeRO-3
    out["one_to_two"] = _outcome(one)

    # What a world size loads from a checkpoint of another world size, saved again to be gathered.
    for name, world, source, args in (("two-on-one", 1, root / "two-step-3", two_args),
                                      ("one-on-two", 2, root / "saved-by-one" / "step-3", zero3)):
        if name == "two-on-one":
            shutil.copytree(two / "checkpoints" / "step-3", source)
        rendezvous = RendezvousStore()
        run_ranks(_reload_and_save, (world, rendezvous.env, str(data), str(source), str(root / name),
                                     [a for a in args if "checkpoint." not in a]), nprocs=world)
        out[name] = (source, root / name / "step-3")
    return out


def test_resume_at_the_same_world_size_is_exact(jobs: dict) -> None:
    assert "resumed from" in jobs["two_resumed_log"] and "step-3" in jobs["two_resumed_log"]
    assert jobs["two_resumed"] == jobs["two"], "per-step losses and results equal an uninterrupted run"
    assert [s for s, _ in jobs["two"]["losses"]] == list(range(1, 9)), "every step logged once"


@pytest.mark.parametrize("case", ["two-on-one", "one-on-two"])
def test_another_world_size_loads_every_tensor_exactly(jobs: dict, case: str) -> None:
    source, resaved = jobs[case]
    saved, loaded = _consolidated(source, jobs["root"]), _consolidated(resaved, jobs["root"])
    assert saved.keys() == loaded.keys()
    groups = {key.split("/")[1] for key in saved}
    assert groups == {"tables", "table_optimizer", "dense", "dense_optimizer"}
    # fused row-sparse Adam's m and v of the row-wise video table, torch Adam's of the data-parallel authors
    assert any(k.endswith("ranking__video_id.momentum1") for k in saved)
    assert any(k.endswith("ranking__video_id.exp_avg_sq") for k in saved)
    assert any(k.endswith("ranking__author_id.weight/exp_avg") for k in saved)
    for key, value in saved.items():
        assert torch.equal(value, loaded[key]), key


@pytest.mark.parametrize("case, reference", [("two_to_one", "two"), ("one_to_two", "one")])
def test_another_world_size_continues_the_run(jobs: dict, case: str, reference: str) -> None:
    got, want = jobs[case], jobs[reference]
    assert [s for s, _ in got["losses"]] == [s for s, _ in want["losses"]], "continues at the next global batch"
    assert got["losses"][:3] == want["losses"][:3], "rows up to the checkpoint are kept"
    for (_, a), (_, b) in zip(got["losses"], want["losses"]):
        assert a == pytest.approx(b, rel=1e-4)
    assert got["results"]["train_requests"] == want["results"]["train_requests"]
    assert got["results"]["joint_recall"] == pytest.approx(want["results"]["joint_recall"], abs=0.005)


# ---- a rank killed under torchrun --------------------------------------------------------------

KILL_ARGS = [*LOGGED, "--checkpoint.every_steps=4", "--data.batch_size=8"]  # 13 global batches a day


def _last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, json.JSONDecodeError):
        return 0


@pytest.fixture(scope="module")
def killed(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The default path (data-parallel tables, torch Adam, ZeRO-0) on 2 ranks: uninterrupted, and with
    rank 1 killed with SIGKILL from outside in the middle of the first day."""
    root, data = tmp_path_factory.mktemp("killed"), dataset
    _run(root / "plain", data, 2, *KILL_ARGS)
    proc = _launch(root / "killed", data, 2, *KILL_ARGS, MAX_RESTARTS="2")
    victim, deadline = None, time.monotonic() + TIMEOUT_S
    while victim is None and proc.poll() is None and time.monotonic() < deadline:
        checkpoints = list((root / "killed" / "checkpoints").glob("step-*"))
        if checkpoints and 6 <= _last_step(root / "killed") < 12:
            workers = _children(proc.pid)
            if len(workers) == 2:
                victim = workers[-1]
                os.kill(victim, signal.SIGKILL)
        time.sleep(0.01)
    out = _finish(proc)
    return {"plain": _outcome(root / "plain"), "killed": _outcome(root / "killed"), "log": out, "victim": victim}


def test_killed_rank_restarts_and_ends_as_an_uninterrupted_run(killed: dict) -> None:
    assert killed["victim"] is not None, "the run ended before a rank could be killed"
    assert "resumed from" in killed["log"], killed["log"][-3000:]
    assert killed["killed"]["results"] == killed["plain"]["results"]
    # No step trained twice or skipped: the metrics rows are the uninterrupted run's, once each.
    assert killed["killed"]["losses"] == killed["plain"]["losses"]
    assert [s for s, _ in killed["plain"]["losses"]] == list(range(1, 27))


# ---- bad checkpoints and a crash during a save (one process, world size 1) -------------------------

def _bad_checkpoint_cases(rank: int, data: str, data3: str, saved: str, root: str, phase: str) -> None:
    os.environ.update(OMP_NUM_THREADS="1")  # a world of one: the trainer serves its own rendezvous
    root_dir = Path(root)
    log = open(root_dir / f"{phase}.log", "a")
    os.dup2(log.fileno(), 2)  # the trainer's warnings, for the test to read
    import torch.distributed.checkpoint as dcp

    from lcron_dist.config import load_config
    from lcron_dist.trainer import Trainer

    report_path = root_dir / f"{phase}.json"
    report: dict = {}

    def trainer(name: str, resume: str, *extra: str, dataset: str = data) -> Trainer:
        return Trainer(load_config("configs/tiny-2stage.toml", [
            f"--data.path={dataset}", f"--run.dir={root}/{name}", *LOGGED, *SHARDED, "--data.batch_size=64",
            f"--checkpoint.resume={resume}", f"--checkpoint.dir={root}/{name}/checkpoints", *extra]))

    def attempt(name: str, resume: str, *extra: str, dataset: str = data) -> dict:
        try:
            return {"step": trainer(name, resume, *extra, dataset=dataset).progress.step}
        except ValueError as exc:
            return {"error": str(exc)}

    def copy(name: str, steps: tuple[int, ...]) -> Path:
        target = root_dir / name / "checkpoints"
        for step in steps:
            shutil.copytree(Path(saved) / f"step-{step}", target / f"step-{step}")
        return target

    if phase == "cases":
        report["other_model"] = {
            "emb_dim": attempt("m1", f"{saved}/step-4", "--model.emb_dim=4"),
            "towers": attempt("m2", f"{saved}/step-4", "--model.din_hidden=16"),
            "stages": attempt("m3", f"{saved}/step-4", "--model.num_stages=3", dataset=data3),
        }
        for damage in DAMAGES:
            target = copy(damage, (3, 4))
            shards = sorted((target / "step-4").glob("*.distcp"), key=lambda p: p.stat().st_size)
            victim = target / "step-4" / "manifest.json" if "manifest" in damage else shards[0]
            if damage == "truncated":
                victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
            elif damage == "altered":  # one byte changed in place in the largest shard: same size
                victim = shards[-1]
                data = bytearray(victim.read_bytes())
                data[len(data) // 2] ^= 0xFF
                victim.write_bytes(bytes(data))
            elif damage == "manifest_not_json":
                victim.write_text(victim.read_text()[:-40])
            elif damage in ("manifest_without_files", "manifest_of_another_format"):
                manifest = json.loads(victim.read_text())
                if damage == "manifest_without_files":
                    del manifest["files"]
                else:
                    manifest["format"] -= 1
                victim.write_text(json.dumps(manifest))
            else:
                victim.unlink()
            report[damage] = {"auto": attempt(damage, "auto"), "explicit": attempt(damage, str(target / "step-4")),
                              "file": str(victim)}
        report["to_data_parallel"] = attempt("dp", f"{saved}/step-4", "--parallelism.table_sharding.video_id=data_parallel")
        moved = trainer("tw", f"{saved}/step-4", "--parallelism.table_sharding.video_id=table_wise")
        table = "sparse.ranking.ebc.embedding_bags.ranking__video_id.weight"
        loaded = moved.model.state_dict()[table].local_shards()[0].tensor
        expected = {table: torch.empty_like(loaded)}
        dcp.load({"tables": expected}, checkpoint_id=f"{saved}/step-4")
        report["to_table_wise"] = {"step": moved.progress.step, "equal": bool(torch.equal(loaded, expected[table]))}
        report_path.write_text(json.dumps(report))
    elif phase == "crash":
        target = copy("crash", (3,))
        t = trainer("crash", "auto")
        t.train_step(next(t.reader.iter_day(t.train_days[0], shuffle=True, start=3)))
        t.progress.step += 1
        tmp = target / ".tmp-step-4"  # what Checkpointer.save writes before it commits
        tmp.mkdir()
        dcp.save(t._checkpoint_state(), checkpoint_id=str(tmp))  # noqa: SLF001
        report_path.write_text(json.dumps({"shards": sorted(p.name for p in tmp.iterdir())}))
        os.kill(os.getpid(), signal.SIGKILL)  # dies before the manifest and the rename
    else:  # restart after the crash
        t = trainer("crash", "auto")
        report_path.write_text(json.dumps({"step": t.progress.step, "left": sorted(
            p.name for p in (root_dir / "crash" / "checkpoints").iterdir())}))


@pytest.fixture(scope="module")
def bad(jobs: dict, tiny_raw: Path) -> dict:
    root = jobs["root"] / "bad"
    root.mkdir()
    data3 = jobs["root"] / "dataset3"
    convert.convert(tiny_raw, data3, num_stages=3, progress=False)
    ctx = mp.get_context("spawn")
    exitcodes = {}
    for phase in ("cases", "crash", "restart"):
        proc = ctx.Process(target=_bad_checkpoint_cases, args=(0, str(jobs["data"]), str(data3),
                                                               str(jobs["root"] / "saved-by-one"), str(root), phase))
        proc.start()
        proc.join(TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            pytest.fail(f"phase {phase} hung")
        exitcodes[phase] = proc.exitcode
    return {phase: json.loads((root / f"{phase}.json").read_text()) for phase in exitcodes} | {
        "exitcodes": exitcodes, "logs": {p: (root / f"{p}.log").read_text() for p in exitcodes}}


def test_checkpoint_of_another_model_is_refused_naming_the_first_mismatch(bad: dict) -> None:
    other = bad["cases"]["other_model"]
    assert "model.tables.retrieval__user_id: the checkpoint has [61, 8], this run has [61, 4]" in other["emb_dim"]["error"]
    assert "model.dense.towers.ranking." in other["towers"]["error"]
    assert "model.num_stages: the checkpoint has 2, this run has 3" in other["stages"]["error"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoint_is_never_loaded(bad: dict, damage: str) -> None:
    case = bad["cases"][damage]
    assert case["auto"] == {"step": 3}, "auto falls back to the previous complete checkpoint"
    assert case["file"] in case["explicit"]["error"], "an explicit path fails naming the file"
    assert DAMAGE_MESSAGES[damage] in case["explicit"]["error"], case["explicit"]["error"]
    warnings = [line for line in bad["logs"]["cases"].splitlines() if "skipping damaged checkpoint" in line]
    assert any(case["file"] in line for line in warnings), "auto's fallback warns, naming this case's file"


def test_sharding_type_change_keeps_optimizer_state_or_is_refused(bad: dict) -> None:
    refused = bad["cases"]["to_data_parallel"]["error"]
    assert "video_id" in refused and "row_wise" in refused and "data_parallel" in refused
    assert bad["cases"]["to_table_wise"] == {"step": 4, "equal": True}, "row_wise -> table_wise reshards"


def test_crash_during_a_save_leaves_the_previous_checkpoint(bad: dict) -> None:
    assert bad["exitcodes"]["crash"] == -signal.SIGKILL
    assert any(name.endswith(".distcp") for name in bad["crash"]["shards"]), "the crash came after shards were written"
    assert bad["restart"] == {"step": 3, "left": ["step-3"]}, "resumed from step 3; the unfinished save removed"
    assert "left by a save that did not finish" in bad["logs"]["restart"]
