"""The Trainer: builds everything in a fixed order, owns the day loop and evaluation.

distributed init -> seed -> data -> loss and model (tables on the meta device) -> shard tables
(TorchRec DMP) -> wrap dense parameters (DeepSpeed) -> optimizers -> metrics. Training is one
chronological pass over the training days (shuffled within a day by seed), then the test day.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import record_function
from tqdm import tqdm

from lcron_dist.components.logging import MetricsSink, build_logger
from lcron_dist.components.profiling import (
    PhaseTimer,
    maybe_enable_memory_snapshot,
    maybe_enable_profiling,
    peak_memory_mib,
)
from lcron_dist.config import JobConfig, to_dict
from lcron_dist.data import schema
from lcron_dist.data.reader import DayReader, LocalReader
from lcron_dist.distributed.dense import build_dense_engine
from lcron_dist.distributed.process_group import DistInfo, init_distributed
from lcron_dist.distributed.sharding import apply_sharding, apply_table_init, build_sparse_optimizer
from lcron_dist.losses import build_loss
from lcron_dist.metrics import CascadeMetrics
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
    def __init__(self, config: JobConfig) -> None:
        self.config = config
        self.dist = init_distributed()
        self.device = self.dist.device
        self.log = build_logger(self.dist.rank)
        self.log.info("rank %d of %d (local rank %d) on %s, backend %s", self.dist.rank, self.dist.world_size,
                      self.dist.local_rank, self.device, self.dist.backend)
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
        self.train_days, self.test_day = resolve_days(config, meta.day_list)

        loss = build_loss(config.loss.name, num_stages=config.model.num_stages, **config.loss.options)
        model = Cascade(config.model, meta.vocab_sizes, loss, device="meta")
        model.dense.to(self.device)
        slots = max(meta.num_candidates, meta.seq_len)  # Batch.num_slots: the KJT's bags per request
        self.model, plan = apply_sharding(model, config, self.device, self.dist.world_size, slots)
        apply_table_init(self.model, seed)
        if self.dist.is_main:
            (self.run_dir / "plan.md").write_text(plan + "\n")
            self.log.info("sharding plan:\n%s", plan)
        self.sparse_optimizer = build_sparse_optimizer(self.model, config)
        # DMP shards `model` in place, so model.dense is the module the DMP forward runs.
        self.engine = build_dense_engine(model.dense, config, self.dist.world_size, self.device)
        self.stages = model.stages
        self.sink = MetricsSink(self.run_dir, self.dist.is_main, config.run.tensorboard)
        self.timer = PhaseTimer(self.device)
        self.step = 0

    # ---- training -----------------------------------------------------------------------------

    def autocast(self) -> torch.autocast:
        """bf16 compute of the towers and loss on CUDA when parallelism.bf16 (fp32 weights, tables, optimizer)."""
        enabled = self.device.type == "cuda" and self.config.parallelism.bf16
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    def train_step(self, batch) -> dict[str, torch.Tensor]:
        phase = self.timer.phase
        with phase("data"):
            batch = batch.to(self.device)
        with phase("forward"), self.autocast():
            out, _ = self.model(batch)
        with phase("backward"):
            self.engine.backward(out.total)
        with phase("dense_step"):
            self.engine.step()
        with phase("sparse_step"):
            self.sparse_optimizer.step()
            self.sparse_optimizer.zero_grad()
        return {"loss": out.total.detach(), **out.parts}

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
        row = {"step": self.step, "day": str(day), **dict(zip(parts, values.tolist())),
               "requests_per_s": requests * self.dist.world_size / max(seconds, 1e-9),
               **self.timer.shares(),  # rank 0's phase shares
               **{f"{key}/rank{r}": per_rank[r, i].item() for r in range(per_rank.shape[0])
                  for i, key in enumerate(memory)}}
        self.sink.write(row)
        if self.dist.is_main:
            self.log.info("step %d day %s %s", self.step, day,
                          " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                                   if k not in ("step", "day")))

    def train(self, days: list[dt.date]) -> tuple[int, float]:
        """One chronological pass over `days`, continuing from the current weights.

        Returns:
            (requests trained on all ranks, seconds on this rank).
        """
        self.model.train()
        total_requests, total_seconds = 0, 0.0
        limit = self.config.train.max_steps_per_day
        p = self.config.profiling
        with maybe_enable_profiling(p.enable_profiling, self.run_dir / "traces", self.dist.rank,
                                    p.profile_start_step, p.profile_steps, self.device) as profiler:
            for i, day in enumerate(days):
                if i + 1 < len(days):  # the next day streams in while this one trains
                    self.reader.prefetch(days[i + 1], shuffle=True)
                steps = self.reader.num_batches(day)
                steps = min(steps, limit) if limit else steps
                bar = tqdm(total=steps, desc=f"train {day}", unit="step",
                           disable=not (self.dist.is_main and self.config.run.progress))
                window_requests, window_start = 0, time.perf_counter()
                day_start = time.perf_counter()
                batches = self.reader.iter_day(day, shuffle=True)
                for _ in range(steps):
                    self.timer.sync = (self.step + 1) % self.config.run.log_every == 0
                    with self.timer.phase("data"):
                        batch = next(batches)
                    parts = self.train_step(batch)
                    self.step += 1
                    total_requests += batch.size
                    window_requests += batch.size
                    bar.update()
                    if profiler is not None:
                        profiler.step()
                    if self.step % self.config.run.log_every == 0:
                        self._log_step(day, parts, window_requests, time.perf_counter() - window_start)
                        window_requests, window_start = 0, time.perf_counter()
                batches.close()
                bar.close()
                total_seconds += time.perf_counter() - day_start
        requests = torch.tensor([total_requests], dtype=torch.int64)
        if self.dist.world_size > 1:
            dist.all_reduce(requests)
        return int(requests.item()), total_seconds

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
        rows, trained = [], 0
        history = [d for d in self.reader.meta.day_list if d < days[0]]
        if not history:
            raise ValueError(f"no day before {days[0]} in {self.config.data.path} to train on")
        pending = history
        for day in days:
            trained += self.train(pending)[0]
            metrics = self.evaluate(day)
            rows.append({"day": str(day), "method": self.config.loss.name, "train_requests": trained, **metrics})
            if self.dist.is_main:
                self.log.info("stream %s: joint recall %.4f after %d training requests", day, metrics["joint_recall"], trained)
            pending = [day]
        return rows

    def run(self) -> dict:
        with maybe_enable_memory_snapshot(self.config.profiling.enable_memory_snapshot, self.run_dir / "memory",
                                          self.dist.rank, self.device):
            train_requests, train_seconds = self.train(self.train_days)
            metrics = self.evaluate(self.test_day)
        results = {
            "method": self.config.loss.name,
            "num_stages": self.config.model.num_stages,
            "seed": self.config.train.seed,
            "test_day": str(self.test_day),
            "train_days": [str(d) for d in self.train_days],
            "joint_recall": metrics["joint_recall"],
            "stages": {s: {"recall": metrics[f"{s}/recall"], "ndcg@10": metrics[f"{s}/ndcg@10"]} for s in self.stages},
            "train_requests": train_requests,
            "train_seconds": train_seconds,
            "train_requests_per_s": train_requests / max(train_seconds, 1e-9),
            "eval_requests": metrics["requests"],
            "world_size": self.dist.world_size,
        }
        if self.dist.is_main:
            (self.run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
            self.log.info("results: %s", json.dumps(results))
        return results
