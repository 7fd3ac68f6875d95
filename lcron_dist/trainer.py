"""The Trainer: builds everything in a fixed order, owns the day loop and evaluation.

distributed init -> seed -> data -> loss and model (tables on the meta device) -> shard tables
(TorchRec DMP) -> wrap dense parameters (DeepSpeed) -> optimizers -> checkpoint state (resume or warm
start) -> metrics. Training is one chronological pass over the training days (shuffled within a day by
seed), then the test day; checkpoints are saved every `checkpoint.every_steps` and at day ends.
"""

from __future__ import annotations

import datetime as dt
import functools
import itertools
import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm import tqdm

from lcron_dist.components.allocator import keep_freed_memory
from lcron_dist.components.checkpoint import (
    CheckpointCallback,
    CheckpointError,
    Checkpointer,
    checkpoint_steps,
    config_changes,
    first_mismatch,
    library_versions,
)
from lcron_dist.components.compiler import prepare_inductor_in_background
from lcron_dist.components.finite import NonFiniteLoss, check_finite_loss
from lcron_dist.components.logging import MetricsSink, build_logger
from lcron_dist.components.profiling import (
    PhaseTimer,
    maybe_enable_memory_snapshot,
    maybe_enable_profiling,
    peak_memory_mib,
)
from lcron_dist.components.progress import TrainProgress
from lcron_dist.config import JobConfig, to_dict
from lcron_dist.data import schema
from lcron_dist.data.batch import Batch
from lcron_dist.data.reader import DayReader, LocalReader
from lcron_dist.distributed.dense import build_dense_engine, dense_optimizer_step, gather_dense_state, load_dense_state
from lcron_dist.distributed.pipeline import SparseDistPipeline, StepOutput
from lcron_dist.distributed.process_group import DistInfo, init_distributed
from lcron_dist.distributed.sharding import (
    apply_sharding,
    apply_table_init,
    build_sparse_optimizer,
    init_table_optimizer_state,
    sharding_types,
    table_state_layout,
)
from lcron_dist.losses import build_loss
from lcron_dist.metrics import CascadeMetrics, metrics_summary
from lcron_dist.models import Cascade


def build_reader(config: JobConfig, batch_size: int, info: DistInfo) -> DayReader:
    """The configured reader of this rank's share of each day."""
    if config.data.reader == "ray":
        from lcron_dist.data.ray_reader import RayReader

        r = config.ray
        return RayReader(config.data.path, batch_size, info.rank, info.world_size, config.train.seed,
                         address=r.address, num_cpus=r.num_cpus, object_store_mb=r.object_store_mb,
                         local_rank=info.local_rank)
    return LocalReader(config.data.path, batch_size, info.rank, info.world_size, config.train.seed)


def resolve_days(config: JobConfig, available: list[dt.date]) -> tuple[list[dt.date], dt.date]:
    """Training days and test day from the config (defaults: the last day tests, the days before train)."""
    test_day = schema.parse_day(config.data.test_day) if config.data.test_day else available[-1]
    if config.data.train_days:
        train_days = schema.parse_days(config.data.train_days)
    else:
        train_days = [d for d in available if d < test_day]
    missing = [d for d in [*train_days, test_day] if d not in available]
    if missing:
        raise ValueError(f"day {missing[0]} is not in dataset {config.data.path} "
                         f"(it has {available[0]} .. {available[-1]})")
    if any(d >= test_day for d in train_days):
        raise ValueError(f"training days must come before the test day {test_day}")
    return train_days, test_day


class Trainer:
    """Builds the job from its config and runs it.

    Args:
        config: the resolved job config.
        on_checkpoint: called on every rank after each committed checkpoint (Ray Train reports it).
    """

    def __init__(self, config: JobConfig, on_checkpoint: CheckpointCallback | None = None) -> None:
        self.config = config
        self.dist = init_distributed()
        self.device = self.dist.device
        self.log = build_logger(self.dist.rank)
        self.log.info("rank %d of %d (local rank %d) on %s, backend %s, %d torch threads", self.dist.rank,
                      self.dist.world_size, self.dist.local_rank, self.device, self.dist.backend, torch.get_num_threads())
        if self.device.type == "cpu":
            keep_freed_memory(self.log)
            if config.model.compile:
                prepare_inductor_in_background()
        self.run_dir = Path(config.run.dir)
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(to_dict(config), indent=2) + "\n")
            self.log.info("config: %s", json.dumps(to_dict(config)))

        seed = config.train.seed
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

        self.reader = build_reader(config, config.data.batch_size, self.dist)
        self.eval_reader = build_reader(config, config.data.eval_batch_size, self.dist)
        meta = self.reader.meta
        if meta.num_stages != config.model.num_stages:
            raise ValueError(f"model.num_stages is {config.model.num_stages} but dataset {config.data.path} "
                             f"was converted for {meta.num_stages} stages")
        # The first day to train streams in while the model is built and its tables planned (seconds, most
        # of them importing inductor). A run that starts on another day (resumed past it, or lcron-stream)
        # drops it at train()'s first prefetch.
        first_day = schema.parse_days(config.data.train_days)[0] if config.data.train_days else meta.day_list[0]
        if first_day in meta.day_list:
            self.reader.prefetch(first_day, shuffle=True)

        loss = build_loss(config.loss.name, num_stages=config.model.num_stages, **config.loss.options)
        model = Cascade(config.model, meta.vocab_sizes, loss, device="meta")
        model.dense.to(self.device)
        self.signature = model.signature()  # what a checkpoint must match to load into this model
        slots = schema.item_slots(meta.num_candidates, meta.seq_len)  # Batch.num_slots
        self.model, plan = apply_sharding(model, config, self.device, self.dist.world_size, slots)
        apply_table_init(self.model, seed)
        if self.dist.is_main:
            (self.run_dir / "plan.md").write_text(plan + "\n")
            self.log.info("sharding plan:\n%s", plan)
        self.sparse_optimizer = build_sparse_optimizer(self.model, config)
        # DMP shards `model` in place, so model.dense is the module the DMP forward runs.
        self.engine = build_dense_engine(model.dense, config, self.dist.world_size, self.device)
        self.stages = model.stages
        self.timer = PhaseTimer(self.device)
        self.pipeline = (SparseDistPipeline(self.model, self.sparse_optimizer, self.device, self.timer, self._forward,
                                            self._backward, self._optimizer_step) if config.train.pipeline else None)
        self.log.info("train pipeline: %s", "TorchRec's TrainPipelineSparseDist (the next batch's input distribution "
                      "runs during this batch's step)" if self.pipeline else "none (one batch at a time)")

        ck = config.checkpoint
        self.checkpointer = Checkpointer(Path(ck.dir) if ck.dir else self.run_dir / "checkpoints", ck.keep,
                                         self.dist.rank, self.log)
        self.on_checkpoint = on_checkpoint
        self.progress = TrainProgress()
        self.checkpointer.remove_leftovers()
        resumed = self.maybe_resume(ck.resume)
        # A resumed run keeps the metrics rows up to its checkpoint; those after it are trained again.
        self.sink = MetricsSink(self.run_dir, self.dist.is_main, config.run.tensorboard,
                                keep_until=self.progress.step if resumed else None)

    @functools.cached_property
    def days(self) -> tuple[list[dt.date], dt.date]:
        """(training days, test day): data.train_days and data.test_day resolved against the dataset
        (checked on first use: lcron-stream does not use them)."""
        return resolve_days(self.config, self.reader.meta.day_list)

    @property
    def train_days(self) -> list[dt.date]:
        return self.days[0]

    @property
    def test_day(self) -> dt.date:
        return self.days[1]

    # ---- checkpoints --------------------------------------------------------------------------

    def _checkpoint_state(self, dense_state: dict | None = None) -> dict:
        """The DCP state dict of the run: tables and their optimizer, dense weights and optimizer state.

        Args:
            dense_state: for a load, {name: {key: shape}} of the checkpoint's dense optimizer state:
                the dense part is then empty templates of the model's and the checkpoint's shapes; None
                for a save (the live dense state is gathered).
        """
        tables = {k: v for k, v in self.model.state_dict().items() if not k.startswith("dense.")}
        if dense_state is None:
            weights, states = gather_dense_state(self.engine)
        else:
            weights = {name: torch.empty(shape) for name, shape in self.signature["dense"].items()}
            states = {name: {key: torch.empty(shape) for key, shape in keys.items()} for name, keys in dense_state.items()}
        return {"tables": tables, "table_optimizer": self.sparse_optimizer.state_dict(), "dense": weights,
                "dense_optimizer": states}

    def save_checkpoint(self) -> Path:
        """Commit the run's state at the current step (collective)."""
        state = self._checkpoint_state()
        manifest = {
            "run_dir": str(self.run_dir.resolve()),
            "progress": self.progress.to_dict(),
            "world_size": self.dist.world_size,
            "global_batch": self.config.data.batch_size * self.dist.world_size,
            "model": self.signature,
            "plan": {"sharding": sharding_types(self.model),
                     "table_state": table_state_layout(state["table_optimizer"], list(self.signature["tables"]))},
            "dense_state": {name: {k: list(v.shape) for k, v in keys.items()} for name, keys in state["dense_optimizer"].items()},
            "dense_optimizer_step": dense_optimizer_step(self.engine),
            "versions": library_versions(),
            "config": to_dict(self.config),
            "saved_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        path = self.checkpointer.save(self.progress.step, state, manifest)
        if self.on_checkpoint is not None:
            self.on_checkpoint(path, manifest)
        return path

    def _check_compatible(self, path: Path, manifest: dict) -> None:
        """Refuse a checkpoint of another model, or one whose table optimizer state this plan cannot take."""
        mismatch = first_mismatch(manifest["model"], self.signature, "model")
        if mismatch:
            raise CheckpointError(f"checkpoint {path} is of another model: {mismatch}")
        now_sharding = sharding_types(self.model)
        now_layout = table_state_layout(self.sparse_optimizer.state_dict(), list(self.signature["tables"]))
        then_sharding, then_layout = manifest["plan"]["sharding"], manifest["plan"]["table_state"]
        for table, layout in then_layout.items():
            if layout != now_layout[table]:
                raise CheckpointError(
                    f"table {table}: checkpoint {path} holds its optimizer state as {layout} "
                    f"({then_sharding[table]}, {manifest['config']['parallelism']['table_optimizer']}); this run "
                    f"keeps {now_layout[table]} ({now_sharding[table]}, {self.config.parallelism.table_optimizer}). "
                    f"Loading would lose that state: resume with --parallelism.table_sharding.{table}="
                    f"{then_sharding[table]} and the same table_optimizer")
            if then_sharding[table] != now_sharding[table]:
                self.log.info("table %s: resharded from %s to %s", table, then_sharding[table], now_sharding[table])

    def maybe_resume(self, resume: str) -> bool:
        """Load the checkpoint `resume` names (checkpoint.resume), if any.

        A checkpoint of this run folder resumes the run where it stopped (step, data cursor, counters);
        one of another run is a warm start: its model, optimizer state and step count, then the
        configured training days from their start.

        Returns:
            True when this run resumed from its own checkpoint.
        """
        found = self.checkpointer.resolve(resume)
        if found is None:
            return False
        path, manifest = found
        init_table_optimizer_state(self.sparse_optimizer)  # to compare its layout, then to load into
        self._check_compatible(path, manifest)
        saved = TrainProgress.from_dict(manifest["progress"])
        same_run = Path(manifest["run_dir"]) == self.run_dir.resolve()
        global_batch = self.config.data.batch_size * self.dist.world_size
        if same_run and saved.batches and not saved.day_done and manifest["global_batch"] != global_batch:
            raise CheckpointError(
                f"checkpoint {path} stopped after {saved.batches} global batches of {manifest['global_batch']} "
                f"requests on {saved.day}; this run's global batch is {global_batch} (data.batch_size × world size): "
                f"resume with data.batch_size={manifest['global_batch'] // self.dist.world_size}"
                if manifest["global_batch"] % self.dist.world_size == 0 else
                f"checkpoint {path} stopped in the middle of {saved.day} with a global batch of "
                f"{manifest['global_batch']} requests, which {self.dist.world_size} ranks cannot split evenly")
        start = time.perf_counter()
        state = self._checkpoint_state(dense_state=manifest["dense_state"])
        self.checkpointer.load(path, state)
        self.sparse_optimizer.load_state_dict(state["table_optimizer"])
        load_dense_state(self.engine, state["dense"], state["dense_optimizer"], manifest["dense_optimizer_step"])
        # fbgemm's fused optimizers count steps outside their state dict (Adam's bias correction uses it).
        self.sparse_optimizer.set_optimizer_step(saved.step)
        self.progress = saved if same_run else TrainProgress(step=saved.step)
        changes = config_changes(manifest["config"], to_dict(self.config))
        if changes and self.dist.is_main:
            self.log.warning("settings differ from checkpoint %s: %s", path.name, "; ".join(changes))
        self.log.info("%s from %s (step %d, %s) in %.2f s", "resumed" if same_run else "warm start",
                      path, saved.step, f"{saved.day}: {saved.batches} global batches"
                      + (" (day done)" if saved.day_done else "") if saved.day else "before any step",
                      time.perf_counter() - start)
        return same_run

    # ---- training -----------------------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        """bf16 compute of the towers and loss on CUDA when parallelism.bf16 (fp32 weights, tables, optimizer)."""
        enabled = self.device.type == "cuda" and self.config.parallelism.bf16
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_batches(self, batches: Iterator[Batch]) -> Iterator[StepOutput]:
        """Train on every batch of `batches`, in order, through the train pipeline (train.pipeline) or one
        at a time; yields each step's loss parts and request count once the step is done."""
        if self.pipeline is not None:
            yield from self.pipeline.steps(batches)
            return
        while True:
            with self.timer.phase("data"):
                batch = next(batches, None)
            if batch is None:
                return
            yield self.train_step(batch), batch.size

    def train_step(self, batch: Batch) -> dict[str, torch.Tensor]:
        """One step on `batch`, nothing overlapped."""
        with self.timer.phase("data"):
            batch = batch.to(self.device)
        loss, parts = self._forward(batch)
        self._backward(loss)
        self._optimizer_step()
        self.sparse_optimizer.zero_grad()
        return parts

    # A step's parts, shared by the plain loop (train_step) and the train pipeline.

    def _forward(self, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of `batch` and its detached parts ({'loss': total, **parts})."""
        with self.timer.phase("forward"), self.autocast():
            out, _ = self.model(batch)
        return out.total, {"loss": out.total.detach(), **out.parts}

    def _backward(self, loss: torch.Tensor) -> None:
        """Check the loss on every rank (NonFiniteLoss before any rank steps), then its backward."""
        check_finite_loss(loss)
        with self.timer.phase("backward"):
            self.engine.backward(loss)

    def _optimizer_step(self) -> None:
        with self.timer.phase("dense_step"):
            self.engine.step()
        with self.timer.phase("sparse_step"):
            self.sparse_optimizer.step()

    def _log_step(self, day: dt.date, parts: dict[str, torch.Tensor], requests: int, seconds: float) -> None:
        values = torch.stack([v.float() for v in parts.values()])
        if self.dist.world_size > 1:  # reduce only on log steps
            dist.all_reduce(values)
            values /= self.dist.world_size
        memory = peak_memory_mib(self.device)
        per_rank = torch.tensor([list(memory.values())], dtype=torch.float64, device=self.device)
        if self.dist.world_size > 1:
            gathered = [torch.empty_like(per_rank) for _ in range(self.dist.world_size)]
            dist.all_gather(gathered, per_rank)
            per_rank = torch.cat(gathered)
        row = {"step": self.progress.step, "day": str(day), **dict(zip(parts, values.tolist())),
               "requests_per_s": requests * self.dist.world_size / max(seconds, 1e-9),
               **self.timer.shares(),  # rank 0's phase shares
               **{f"{key}/rank{r}": per_rank[r, i].item() for r in range(per_rank.shape[0])
                  for i, key in enumerate(memory)}}
        self.sink.write(row)
        if self.dist.is_main:
            self.log.info("step %d day %s %s", self.progress.step, day,
                          " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                   if k not in ("step", "day")))

    def _save_due(self, last_of_day: bool) -> bool:
        every = self.config.checkpoint.every_steps
        return bool(every and self.progress.step % every == 0) or (last_of_day and self.config.checkpoint.at_day_end)

    def train(self, days: list[dt.date]) -> None:
        """One chronological pass over `days`, continuing from the current weights and the data cursor.

        Days the cursor has passed are skipped; the cursor's day continues at its next global batch.
        Progress (requests, seconds, step) accumulates in self.progress.

        Raises:
            NonFiniteLoss: on every rank, at the first step whose loss is not finite on some rank,
                before any rank steps on it (so the last checkpoint holds the last good state).
        """
        self.model.train()
        todo = [(day, start) for day in days if (start := self.progress.start_batch(day)) is not None]
        p = self.config.profiling
        with maybe_enable_profiling(p.enable_profiling, self.run_dir / "traces", self.dist.rank,
                                    p.profile_start_step, p.profile_steps, self.device) as profiler:
            if todo:  # taken from the set-up's prefetch when that was this day
                self.reader.prefetch(todo[0][0], shuffle=True)
            for i, (day, start) in enumerate(todo):
                batches = self.reader.iter_day(day, shuffle=True, start=start)  # takes this day's prefetch
                if i + 1 < len(todo):  # the next day streams in while this one trains
                    self.reader.prefetch(todo[i + 1][0], shuffle=True)
                try:
                    self._train_day(day, start, batches, profiler)
                except NonFiniteLoss as exc:
                    saved = checkpoint_steps(self.checkpointer.root)
                    raise NonFiniteLoss(
                        f"{exc} at step {self.progress.step + 1} (day {day}, global batch "
                        f"{self.progress.start_batch(day) + 1}): training stopped before any rank stepped on it, "
                        f"and no checkpoint holds it; a restart resumes from "
                        f"{saved[0][1] if saved else 'the start (no checkpoint yet)'}") from None  # newest first
                finally:
                    batches.close()

    def _train_day(self, day: dt.date, start: int, batches: Iterator[Batch], profiler) -> None:
        """Train `day` from its global batch `start` on; log and checkpoint as configured."""
        limit = self.config.train.max_steps_per_day
        sizes = self.reader.global_batch_sizes(day)
        sizes = sizes[:limit] if limit else sizes
        bar = tqdm(total=len(sizes), initial=start, desc=f"train {day}", unit="step",
                   disable=not (self.dist.is_main and self.config.run.progress))
        window_requests, window_start = 0, time.perf_counter()
        step_start = time.perf_counter()
        self.timer.sync = (self.progress.step + 1) % self.config.run.log_every == 0
        for index, (parts, size) in enumerate(self.train_batches(itertools.islice(batches, len(sizes) - start)), start):
            last = index + 1 == len(sizes)
            self.progress.advance(day, sizes[index], last)
            window_requests += size
            bar.update()
            if profiler is not None:
                profiler.step()
            if self.progress.step % self.config.run.log_every == 0:
                self._log_step(day, parts, window_requests, time.perf_counter() - window_start)
                window_requests, window_start = 0, time.perf_counter()
            self.progress.seconds += time.perf_counter() - step_start
            if self._save_due(last):
                self.save_checkpoint()
            step_start = time.perf_counter()  # the next step runs when the loop asks for it
            self.timer.sync = (self.progress.step + 1) % self.config.run.log_every == 0
        bar.close()

    # ---- evaluation ---------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, day: dt.date) -> dict[str, float]:
        """Every request of `day` scored exactly once across ranks; metrics reduced across ranks."""
        self.model.eval()
        metrics = CascadeMetrics(self.stages, self.device, seed=self.config.train.seed)
        bar = tqdm(total=self.eval_reader.num_batches(day), desc=f"eval {day}", unit="step",
                   disable=not (self.dist.is_main and self.config.run.progress))
        for batch in self.eval_reader.iter_day(day, shuffle=False):
            batch = batch.to(self.device)
            with record_function("lcron/eval"), self.autocast():
                _, scores = self.model(batch, compute_loss=False)
            metrics.update(scores, batch.label, batch.mask, batch.target)
            bar.update()
        bar.close()
        self.model.train()
        return metrics.compute()

    # ---- the job ------------------------------------------------------------------------------

    def stream(self, days: list[dt.date]) -> list[dict]:
        """The streaming protocol: for each day t, train on the days before t, then test on t.

        Training continues from the model trained through t−1 (not from scratch): before the first
        test day every earlier day of the dataset is trained once, then one more day per step.

        Returns:
            One row per test day: day, joint_recall, per-stage metrics, requests trained so far.
        """
        absent = [d for d in days if d not in self.reader.meta.day_list]
        if absent:
            raise ValueError(f"stream day {absent[0]} is not in dataset {self.config.data.path}")
        history = [d for d in self.reader.meta.day_list if d < days[0]]
        if not history:
            raise ValueError(f"no day before {days[0]} in {self.config.data.path} to train on")
        pending = history
        for day in days:
            self.train(pending)
            if not any(row["day"] == str(day) for row in self.progress.stream_rows):  # not before a restart
                metrics = self.evaluate(day)
                self.progress.stream_rows.append({"day": str(day), "method": self.config.loss.name,
                                                  "train_requests": self.progress.requests, **metrics})
                if self.dist.is_main:
                    self.log.info("stream %s: joint recall %.4f after %d training requests", day,
                                  metrics["joint_recall"], self.progress.requests)
            pending = [day]
        return [row for row in self.progress.stream_rows if schema.parse_day(row["day"]) in days]

    def run(self) -> dict:
        with maybe_enable_memory_snapshot(self.config.profiling.enable_memory_snapshot, self.run_dir / "memory",
                                          self.dist.rank, self.device):
            self.train(self.train_days)
            metrics = self.evaluate(self.test_day)
        results = {
            "method": self.config.loss.name,
            "num_stages": self.config.model.num_stages,
            "seed": self.config.train.seed,
            "test_day": str(self.test_day),
            "train_days": [str(d) for d in self.train_days],
            **metrics_summary(metrics, self.stages),
            "train_requests": self.progress.requests,
            "train_seconds": self.progress.seconds,
            "train_requests_per_s": self.progress.requests / max(self.progress.seconds, 1e-9),
            "eval_requests": metrics["requests"],
            "world_size": self.dist.world_size,
        }
        if self.dist.is_main:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            self.log.info("results: %s", json.dumps(results))
        return results
