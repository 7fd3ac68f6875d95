"""The job configuration: one dataclass per concern, each field documented and validated.

Sections validate themselves on construction and again after the TOML file and the command-line
overrides have been applied (JobConfig.validate), so a bad value fails before anything is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from lcron_dist.data import schema


class _Section:
    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field and the rule it breaks."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class RunConfig(_Section):
    dir: str = "runs/default"
    """Run folder: resolved config, metrics.jsonl, results.json, plan."""
    log_every: int = 50
    """Steps between log lines (and metrics.jsonl rows)."""
    progress: bool = True
    """Show a progress bar per day on rank 0."""
    tensorboard: bool = False
    """Also write every log step's scalars to RUN/tensorboard (rank 0)."""

    def validate(self) -> None:
        _check(self.log_every >= 1, f"run.log_every must be >= 1, got {self.log_every}")


@dataclass
class DataConfig(_Section):
    path: str = "data/demo/dataset"
    """Converted dataset folder (holding meta.json)."""
    train_days: str = ""
    """Training days: FIRST:LAST (inclusive) or a comma-separated list; empty = every day before test_day."""
    test_day: str = ""
    """Evaluation day (YYYY-MM-DD); empty = the dataset's last day."""
    batch_size: int = 1024
    """Requests per rank and training step."""
    eval_batch_size: int = 4096
    """Requests per rank and evaluation step."""
    reader: str = "local"
    """Where batches come from: local (pyarrow on a local or mounted disk) or ray (Ray Data read tasks)."""

    def validate(self) -> None:
        _check(self.batch_size >= 1, f"data.batch_size must be >= 1, got {self.batch_size}")
        _check(self.eval_batch_size >= 1, f"data.eval_batch_size must be >= 1, got {self.eval_batch_size}")
        _check(self.reader in ("local", "ray"), f"data.reader must be 'local' or 'ray', got {self.reader!r}")
        try:
            if self.train_days:
                schema.parse_days(self.train_days)
        except ValueError as exc:
            raise ValueError(f"data.train_days: {exc}") from None
        try:
            if self.test_day:
                schema.parse_day(self.test_day)
        except ValueError as exc:
            raise ValueError(f"data.test_day: {exc}") from None


@dataclass
class ModelConfig(_Section):
    num_stages: int = 2
    """Cascade setting: 2 (retrieval DSSM, ranking DIN) or 3 (adds pre-ranking MLP); must match the dataset."""
    emb_dim: int = 8
    """Embedding dimension of every id feature."""
    dssm_hidden: list[int] = field(default_factory=lambda: [128, 64, 32])
    """DSSM user and item towers; the last size is the dot-product dimension."""
    mlp_hidden: list[int] = field(default_factory=lambda: [128, 64, 32])
    """Pre-ranking MLP hidden sizes (a final 1-unit layer follows)."""
    din_attention_hidden: int = 80
    """Hidden size of DIN's attention MLP on [history item ‖ target item]."""
    din_hidden: list[int] = field(default_factory=lambda: [128, 128, 32])
    """DIN head hidden sizes (a final 1-unit layer follows)."""
    compile: bool = False
    """torch.compile DIN's attention (fuses it; costs tens of seconds on first call)."""

    def validate(self) -> None:
        _check(self.num_stages in schema.GROUPS, f"model.num_stages must be 2 or 3, got {self.num_stages}")
        _check(self.emb_dim >= 1, f"model.emb_dim must be >= 1, got {self.emb_dim}")
        for name in ("dssm_hidden", "mlp_hidden", "din_hidden"):
            sizes = getattr(self, name)
            _check(len(sizes) >= 1 and all(s >= 1 for s in sizes), f"model.{name} must be positive sizes, got {sizes}")
        _check(self.din_attention_hidden >= 1, f"model.din_attention_hidden must be >= 1, got {self.din_attention_hidden}")


@dataclass
class LossConfig(_Section):
    name: str = "lcron"
    """Loss by registry name (lcron_dist.losses): lcron, bce, icc, rankflow, fs_ranknet, ..."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options of that loss (e.g. tau, q, weighting); defaults as in METHOD.md."""


@dataclass
class OptimConfig(_Section):
    name: str = "adam"
    """Dense optimizer (DeepSpeed client optimizer): adam or adamw."""
    lr: float = 0.01
    """Learning rate of every parameter (the paper: Adam, 0.01, embeddings included)."""
    weight_decay: float = 0.0
    """Weight decay of the dense optimizer."""
    grad_clip: float = 0.0
    """Gradient norm clipping of dense parameters (0 = off)."""

    def validate(self) -> None:
        _check(self.name in ("adam", "adamw"), f"optim.name must be adam or adamw, got {self.name!r}")
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
        _check(self.grad_clip >= 0, f"optim.grad_clip must be >= 0, got {self.grad_clip}")


@dataclass
class TrainConfig(_Section):
    seed: int = 0
    """Seed of initialisation, shuffling within each day and evaluation tie-breaks."""
    max_steps_per_day: int = 0
    """Stop each training day after this many steps (0 = the whole day); for smoke tests."""
    pipeline: bool = True
    """Train through TorchRec's sparse-dist train pipeline: the next batch's input distribution runs while
    this batch trains. false: one batch at a time (the same steps, nothing overlapped)."""

    def validate(self) -> None:
        _check(self.max_steps_per_day >= 0, f"train.max_steps_per_day must be >= 0, got {self.max_steps_per_day}")


@dataclass
class ProfilingConfig(_Section):
    enable_profiling: bool = False
    """torch.profiler over a window of training steps: a Chrome trace per rank in RUN/traces/."""
    profile_start_step: int = 5
    """First profiled step (after warm-up and compilation)."""
    profile_steps: int = 3
    """Steps in the profiled window."""
    enable_memory_snapshot: bool = False
    """CUDA memory history per rank, dumped to RUN/memory/ at the end and on OOM (CPU: peak RSS is logged always)."""

    def validate(self) -> None:
        _check(self.profile_start_step >= 1, f"profiling.profile_start_step must be >= 1, got {self.profile_start_step}")
        _check(self.profile_steps >= 1, f"profiling.profile_steps must be >= 1, got {self.profile_steps}")


@dataclass
class CheckpointConfig(_Section):
    dir: str = ""
    """Checkpoint folder; empty = RUN/checkpoints. Complete checkpoints are its step-<N> folders."""
    every_steps: int = 0
    """Save every this many global steps (0 = only at day ends)."""
    at_day_end: bool = True
    """Save when a training day is done (the day-by-day warm-start points)."""
    keep: int = 3
    """Keep the newest this many complete checkpoints (>= 2: the newest may be the one being replaced)."""
    resume: str = "auto"
    """auto (the newest complete checkpoint in dir, if any), none, or a checkpoint folder to start from."""

    def validate(self) -> None:
        _check(self.every_steps >= 0, f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        _check(self.keep >= 2, f"checkpoint.keep must be >= 2 (the newest complete checkpoint is never "
                               f"removed while another is written), got {self.keep}")
        _check(self.resume != "", "checkpoint.resume must be auto, none or a checkpoint folder, got ''")


@dataclass
class RayConfig(_Section):
    address: str = ""
    """Ray cluster to read with ("auto", "ray://head:10001"); empty = start a local Ray."""
    num_cpus: int = 4
    """Logical CPUs of a local Ray: more than the cores, so read tasks always find a slot."""
    object_store_mb: int = 512
    """Object store of a local Ray, MiB."""

    def validate(self) -> None:
        _check(self.num_cpus >= 1, f"ray.num_cpus must be >= 1, got {self.num_cpus}")
        _check(self.object_store_mb >= 64, f"ray.object_store_mb must be >= 64, got {self.object_store_mb}")


SHARDING_TYPES = ("auto", "data_parallel", "table_wise", "row_wise", "column_wise", "table_row_wise",
                  "table_column_wise")
TABLE_OPTIMIZERS = ("adam", "partial_rowwise_adam", "rowwise_adagrad", "adagrad", "sgd")


@dataclass
class ParallelismConfig(_Section):
    sharding: str = "data_parallel"
    """Default TorchRec sharding of every table: auto (the planner chooses) or one sharding type."""
    table_sharding: dict[str, Any] = field(default_factory=dict)
    """Per-table overrides: {table or feature kind: sharding}, e.g. {video_id = "row_wise"} or
    {"ranking__video_id" = "table_wise"}; a full table name wins over a kind."""
    table_optimizer: str = "adam"
    """Optimizer of the embedding tables: adam, partial_rowwise_adam (v one value per row), rowwise_adagrad,
    adagrad or sgd. Sharded tables run it fused in the backward on the batch's rows (fbgemm; Adam's two
    on CPU by lcron_dist's kernel with fbgemm's CUDA update); data-parallel tables use torch's dense
    optimizer of the name (none for partial_rowwise_adam)."""
    table_lr: float = 0.0
    """Learning rate of the tables (0 = optim.lr)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0-3) of the dense parameters."""
    bf16: bool = False
    """bf16 autocast of towers and loss on CUDA (weights, tables and optimizer states stay fp32; ignored on CPU)."""
    hbm_gb: float = 0.0
    """Planner: accelerator memory per rank in GiB (0 = TorchRec's default for the device)."""
    ddr_gb: float = 0.0
    """Planner: host memory per rank in GiB (0 = TorchRec's default)."""
    intra_host_bw_gbps: float = 0.0
    """Planner: bandwidth between ranks of one host in GB/s (0 = TorchRec's default)."""
    inter_host_bw_gbps: float = 0.0
    """Planner: bandwidth between hosts in GB/s (0 = TorchRec's default)."""
    local_world_size: int = 0
    """Planner: ranks per host (0 = the launcher's LOCAL_WORLD_SIZE, else the world size)."""

    def validate(self) -> None:
        _check(self.sharding in SHARDING_TYPES,
               f"parallelism.sharding must be one of {', '.join(SHARDING_TYPES)}, got {self.sharding!r}")
        for table, kind in self.table_sharding.items():
            _check(kind in SHARDING_TYPES, f"parallelism.table_sharding.{table} must be one of "
                                           f"{', '.join(SHARDING_TYPES)}, got {kind!r}")
        _check(self.table_optimizer in TABLE_OPTIMIZERS, f"parallelism.table_optimizer must be one of "
                                                         f"{', '.join(TABLE_OPTIMIZERS)}, got {self.table_optimizer!r}")
        _check(self.table_lr >= 0, f"parallelism.table_lr must be >= 0, got {self.table_lr}")
        _check(self.zero_stage in (0, 1, 2, 3), f"parallelism.zero_stage must be 0-3, got {self.zero_stage}")
        for name in ("hbm_gb", "ddr_gb", "intra_host_bw_gbps", "inter_host_bw_gbps", "local_world_size"):
            _check(getattr(self, name) >= 0, f"parallelism.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
