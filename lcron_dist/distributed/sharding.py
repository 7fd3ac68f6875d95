"""TorchRec: plan and apply the sharding of every stage's embedding tables, and their optimizer.

Each table gets a sharding type from the config (a default, overridable per table or per feature kind;
`auto` lets TorchRec's planner choose). Sharded tables run their optimizer fused in the backward
(fbgemm; on CPU, Adam and partial row-wise Adam by distributed/row_sparse_adam.py, with fbgemm's CUDA
update); data-parallel tables are replicated and stepped by the torch optimizer of the same name.
Combinations that cannot run are refused at start-up, naming the table and what to choose instead.
"""

from __future__ import annotations

import contextlib
import os
import warnings
import zlib
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import optim as trec_optim
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.types import ShardingOption
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from lcron_dist.config.job_config import SHARDING_TYPES, JobConfig
from lcron_dist.data import schema
from lcron_dist.distributed.optimizers import fused_if_available
from lcron_dist.distributed.row_sparse_adam import ROW_SPARSE_ADAM, row_sparse_adam_kernels
from lcron_dist.distributed.table_grads import unwrap_single_rank_lookups

FUSED_OPTIMIZERS = {
    "adam": EmbOptimType.ADAM,
    "partial_rowwise_adam": EmbOptimType.PARTIAL_ROWWISE_ADAM,
    "rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
    "adagrad": EmbOptimType.EXACT_ADAGRAD,
    "sgd": EmbOptimType.EXACT_SGD,
}
"""The fused (in-backward) optimizer of sharded tables: fbgemm's, or on CPU row_sparse_adam's for Adam."""

TORCH_OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "rowwise_adagrad": RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
"""Optimizers of data-parallel tables, whose parameters TorchRec leaves unfused: dense updates of every
row (torch's Adam is the research code's exact optimizer). Partial row-wise Adam has none."""

PLANNER_OPTIMIZERS = {**TORCH_OPTIMIZERS, "partial_rowwise_adam": trec_optim.PartialRowWiseAdam}
"""The class TorchRec's storage estimator sizes a table's optimizer state by."""

GIB = 1024**3


class CascadeSharder(EmbeddingBagCollectionSharder):
    """TorchRec's EmbeddingBagCollection sharder, also offering row-wise sharding on CPU.

    TorchRec lists row-wise and table-row-wise only for CUDA, but both run on CPU with gloo (their
    collectives are plain all-to-all and reduce-scatter); the large id tables need them to scale.
    """

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types += [t.value for t in (ShardingType.ROW_WISE, ShardingType.TABLE_ROW_WISE) if t.value not in types]
        return types


def table_names(model: nn.Module) -> list[str]:
    """Every embedding table of the model (EmbeddingBagConfig names: '<stage>__<kind>')."""
    return [t.name for module in model.modules() if hasattr(module, "embedding_bag_configs")
            for t in module.embedding_bag_configs()]


def table_shardings(config: JobConfig, tables: list[str]) -> dict[str, str]:
    """Sharding per table: a per-table override, else a per-kind override, else the default.

    "auto" leaves the table to the planner (on CPU too: Adam's fused kernel there is row_sparse_adam's).
    """
    overrides = config.parallelism.table_sharding
    unknown = [k for k in overrides if k not in tables and not any(t.endswith(f"__{k}") for t in tables)]
    if unknown:
        raise ValueError(f"parallelism.table_sharding names unknown table or kind {unknown[0]!r}; tables: "
                         f"{', '.join(tables)}")
    return {t: overrides.get(t, overrides.get(t.split("__", 1)[-1], config.parallelism.sharding)) for t in tables}


def check_optimizer_support(shardings: dict[str, str], config: JobConfig) -> None:
    """Refuse, before anything is built, a data-parallel table with an optimizer torch does not have."""
    optimizer = config.parallelism.table_optimizer
    if optimizer in TORCH_OPTIMIZERS:
        return
    for table, sharding in shardings.items():
        if sharding == ShardingType.DATA_PARALLEL.value:
            raise ValueError(
                f"table {table}: data_parallel tables are stepped by a torch optimizer, and torch has no "
                f"{optimizer}. Shard this table (table_wise, row_wise, column_wise, table_row_wise or auto: "
                f"{optimizer} runs fused in the backward), or choose parallelism.table_optimizer="
                f"{'|'.join(TORCH_OPTIMIZERS)}."
            )


def uses_row_sparse_adam(config: JobConfig, device: torch.device) -> bool:
    """Whether sharded tables run row_sparse_adam's kernel: Adam or partial row-wise Adam on CPU."""
    return device.type == "cpu" and FUSED_OPTIMIZERS[config.parallelism.table_optimizer] in ROW_SPARSE_ADAM


def describe_table_optimizer(config: JobConfig, device: torch.device, shardings: dict[str, str]) -> str:
    """Which update each kind of table gets, for the start-up log."""
    optimizer = config.parallelism.table_optimizer
    kernel = ("lcron_dist's row-sparse CPU kernel with fbgemm's CUDA update"
              if uses_row_sparse_adam(config, device) else "fbgemm")
    parts = []
    if any(s != ShardingType.DATA_PARALLEL.value for s in shardings.values()):
        parts.append(f"sharded tables: {optimizer} fused in the backward, rows of the batch only ({kernel})")
    if ShardingType.DATA_PARALLEL.value in shardings.values():
        exact = " (the research code's exact optimizer)" if optimizer == "adam" else ""
        parts.append(f"data-parallel tables: torch's dense {optimizer} over every row{exact}")
    return "; ".join(parts)


def build_sharder(config: JobConfig) -> CascadeSharder:
    """The sharder, with the fused table optimizer from the config."""
    lr = config.parallelism.table_lr or config.optim.lr
    return CascadeSharder(fused_params={"optimizer": FUSED_OPTIMIZERS[config.parallelism.table_optimizer],
                                        "learning_rate": lr})


def build_topology(config: JobConfig, device_type: str, world_size: int) -> Topology:
    """TorchRec's view of the cluster, with the config's memory and bandwidth limits where given."""
    p = config.parallelism
    local = p.local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    kwargs: dict = {"world_size": world_size, "compute_device": device_type, "local_world_size": min(local, world_size)}
    if p.hbm_gb:
        kwargs["hbm_cap"] = int(p.hbm_gb * GIB)
    if p.ddr_gb:
        kwargs["ddr_cap"] = int(p.ddr_gb * GIB)
    if p.intra_host_bw_gbps:
        kwargs["intra_host_bw"] = p.intra_host_bw_gbps * 1e9
    if p.inter_host_bw_gbps:
        kwargs["inter_host_bw"] = p.inter_host_bw_gbps * 1e9
    return Topology(**kwargs)


def build_planner(model: nn.Module, config: JobConfig, device_type: str, world_size: int,
                  slots_per_request: int) -> EmbeddingShardingPlanner:
    """TorchRec's planner, constrained per table by the configured sharding.

    Args:
        slots_per_request: the item collections' bags per request (Batch.num_slots), so the planner's
            batch size is each KeyedJaggedTensor's stride as it will see it: B for the user tables,
            B·slots for the item tables.
    """
    shardings = table_shardings(config, table_names(model))
    check_optimizer_support(shardings, config)
    # TorchRec's storage estimator sizes optimizer state from this attribute of each table weight.
    optim_cls = PLANNER_OPTIMIZERS[config.parallelism.table_optimizer]
    for name, weight in model.named_parameters():
        if ".embedding_bags." in name:
            weight._optimizer_classes = [optim_cls]  # noqa: SLF001
    batch = config.data.batch_size
    # Without a torch optimizer of its name, a table cannot be data-parallel: auto picks among the rest.
    auto = None if config.parallelism.table_optimizer in TORCH_OPTIMIZERS else \
        [t for t in SHARDING_TYPES if t not in ("auto", ShardingType.DATA_PARALLEL.value)]
    constraints = {
        table: ParameterConstraints(
            sharding_types=auto if sharding == "auto" else [sharding],
            batch_sizes=[batch if table.split("__", 1)[-1] in schema.USER_FEATURES else batch * slots_per_request])
        for table, sharding in shardings.items()
    }
    return EmbeddingShardingPlanner(
        topology=build_topology(config, device_type, world_size),
        batch_size=batch * slots_per_request,
        constraints=constraints,
        debug=False,
    )


@dataclass
class TablePlacement:
    """Where one table lives, as the planner estimated it."""

    table: str
    sharding: str
    kernel: str
    rows: int
    dim: int
    ranks: list[int]
    bytes_per_rank: dict[int, int]
    """Estimated device + host bytes per rank: weights, optimizer state, I/O buffers."""
    shards: list[tuple[int, int, int]]
    """(rank, rows, columns) of every shard; a data-parallel table has one full-size copy per rank."""


def placements(planner: EmbeddingShardingPlanner) -> list[TablePlacement]:
    """Per-table placements and memory estimates of the planner's last plan."""
    best: list[ShardingOption] = planner._best_plan or []  # noqa: SLF001 (the planner keeps no public copy)
    out = []
    for option in best:
        per_rank: dict[int, int] = defaultdict(int)
        for shard in option.shards:
            if shard.rank is not None and shard.storage is not None:
                per_rank[shard.rank] += int(shard.storage.hbm + shard.storage.ddr)
        shards = [(shard.rank, shard.size[0], shard.size[1]) for shard in option.shards if shard.rank is not None]
        out.append(TablePlacement(option.name, option.sharding_type, option.compute_kernel, option.tensor.shape[0],
                                  option.tensor.shape[1], sorted(per_rank), dict(per_rank), shards))
    return sorted(out, key=lambda p: p.table)


def describe_plan(tables: list[TablePlacement], world_size: int) -> str:
    """A table per embedding table and a total per rank, for the log and the run folder."""
    lines = ["| table | rows × dim | sharding | kernel | ranks | MiB on each rank (max) |", "|---|---|---|---|---|---|"]
    total: dict[int, int] = defaultdict(int)
    for p in tables:
        for rank, size in p.bytes_per_rank.items():
            total[rank] += size
        per = f"{max(p.bytes_per_rank.values(), default=0) / 2**20:,.1f}"
        ranks = f"{p.ranks[0]}..{p.ranks[-1]}" if len(p.ranks) > 2 else ",".join(map(str, p.ranks))
        lines.append(f"| {p.table} | {p.rows:,} × {p.dim} | {p.sharding} | {p.kernel} | {ranks} | {per} |")
    lines.append("")
    lines.append("| rank | estimated MiB (weights + optimizer state + I/O buffers) |")
    lines.append("|---|---|")
    lines += [f"| {rank} | {total.get(rank, 0) / 2**20:,.1f} |" for rank in range(world_size)]
    return "\n".join(lines)


def _table_state_bytes(optimizer: str, rows: int, cols: int) -> int:
    """fp32 optimizer state of a [rows, cols] block: the same for the fused and the torch optimizer of a name."""
    return {"adam": 2 * rows * cols, "partial_rowwise_adam": rows * cols + rows, "adagrad": rows * cols,
            "rowwise_adagrad": rows, "sgd": 0}[optimizer] * 4


def checkpoint_bytes(tables: list[TablePlacement], table_optimizer: str, dense_params: int,
                     world_size: int) -> tuple[dict[int, int], int]:
    """Estimated checkpoint size: what each rank writes of its own table shards, and what is written once.

    Weights and optimizer state are fp32. A sharded table's shards (and their state) are written by the
    rank holding them. Replicated tensors, i.e. data-parallel tables with their state and the dense
    parameters with their Adam moments (unpartitioned, 3x fp32), are written once in total: DCP gives
    each to one rank (the one with the least planned so far), so they spread over the ranks. The files
    are a little larger: DCP adds a header per tensor and a `.metadata` file (+6% on the tiny twin).

    Returns:
        (bytes per rank of sharded tables, bytes written once in total).
    """
    per_rank = dict.fromkeys(range(world_size), 0)
    once = 3 * 4 * dense_params
    for table in tables:
        if table.sharding == ShardingType.DATA_PARALLEL.value:
            once += 4 * table.rows * table.dim + _table_state_bytes(table_optimizer, table.rows, table.dim)
            continue
        for rank, rows, cols in table.shards:
            per_rank[rank] += 4 * rows * cols + _table_state_bytes(table_optimizer, rows, cols)
    return per_rank, once


def describe_checkpoint_size(per_rank: dict[int, int], once: int) -> str:
    """checkpoint_bytes as a table per rank and a line for the replicated part and the total."""
    lines = ["| rank | estimated checkpoint MiB (own table shards + optimizer state) |", "|---|---|"]
    lines += [f"| {rank} | {size / 2**20:,.1f} |" for rank, size in sorted(per_rank.items())]
    lines.append("")
    lines.append(f"written once (data-parallel tables, dense parameters, their optimizer state; DCP spreads them "
                 f"over the ranks): {once / 2**20:,.1f} MiB; checkpoint in total: "
                 f"{(sum(per_rank.values()) + once) / 2**20:,.1f} MiB")
    return "\n".join(lines)


def apply_sharding(model: nn.Module, config: JobConfig, device: torch.device, world_size: int,
                   slots_per_request: int, dense_prefix: str = "dense.") -> tuple[DistributedModelParallel, str]:
    """Shard the embedding tables; the dense part is left to DeepSpeed (DDP ignores it).

    Returns:
        The DMP-wrapped model and a printable description of the plan.
    """
    planner = build_planner(model, config, device.type, world_size, slots_per_request)
    sharder = build_sharder(config)
    plan: ShardingPlan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    dense_names = [name for name, _ in model.named_parameters() if name.startswith(dense_prefix)]
    with row_sparse_adam_kernels() if uses_row_sparse_adam(config, device) else contextlib.nullcontext():
        dmp = DistributedModelParallel(
            model, device=device, plan=plan, sharders=[sharder],
            data_parallel_wrapper=DefaultDataParallelWrapper(params_to_ignore=dense_names),
        )
    if device.type == "cpu" and ShardingType.DATA_PARALLEL.value in sharding_types(dmp).values():
        silence_dense_lookup_warning()
    unwrap_single_rank_lookups(dmp)
    optimizer = describe_table_optimizer(config, device, sharding_types(dmp))
    return dmp, f"{describe_plan(placements(planner), world_size)}\n\ntable optimizer: {optimizer}"


DENSE_LOOKUP_WARNING = (r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered "
                        r"to the Autograd key")
"""Torch's warning on every backward through data-parallel tables on CPU: fbgemm registers that op's
backward as a C++ autograd Function inside its CPU kernel rather than under the Autograd key, which
torch cannot see. The gradients are right (tests/unit/test_models.py proves them against
torch.nn.EmbeddingBag), so this one message is silenced (silence_dense_lookup_warning)."""


def silence_dense_lookup_warning() -> None:
    """Ignore DENSE_LOOKUP_WARNING (and only it) in this process."""
    warnings.filterwarnings("ignore", message=DENSE_LOOKUP_WARNING, category=UserWarning)


def build_sparse_optimizer(dmp: DistributedModelParallel, config: JobConfig, dense_prefix: str = "dense.") -> KeyedOptimizer:
    """Fused (in-backward) table optimizers plus the torch optimizer for data-parallel tables."""
    unfused = {name: p for name, p in in_backward_optimizer_filter(dmp.named_parameters())
               if dense_prefix not in name}
    optimizers: list[tuple[str, KeyedOptimizer]] = [("fused", dmp.fused_optimizer)]
    if unfused:
        optim_cls = TORCH_OPTIMIZERS[config.parallelism.table_optimizer]
        lr = config.parallelism.table_lr or config.optim.lr
        optimizers.append(("tables", KeyedOptimizerWrapper(unfused, lambda params: fused_if_available(optim_cls, params, lr=lr))))
    return CombinedOptimizer(optimizers)


_INIT_BLOCK_ROWS = 1 << 20
"""Rows drawn per generator seed: a shard draws only the blocks it overlaps."""


def _fill_table_rows(out: torch.Tensor, seed: int, table: str, rows: int, dim: int, start: int, column: int = 0) -> None:
    """Write `table`'s initial weights, U(-1/√rows, 1/√rows) as TorchRec draws them, into `out`: its rows
    [start, start + len(out)) and columns [column, column + out.shape[1]).

    Drawn block by block from generators seeded by (seed, table, block), so the values of a row do not
    depend on which rank holds it; one block is the only temporary (a shard is filled in place).
    """
    bound, stop = rows ** -0.5, start + out.shape[0]
    for block in range(start // _INIT_BLOCK_ROWS, (stop - 1) // _INIT_BLOCK_ROWS + 1):
        lo = block * _INIT_BLOCK_ROWS
        g = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{table}/{block}".encode()))
        values = torch.empty(min(_INIT_BLOCK_ROWS, rows - lo), dim).uniform_(-bound, bound, generator=g)
        first, last = max(lo, start), min(lo + len(values), stop)
        out[first - start: last - start].copy_(values[first - lo: last - lo, column: column + out.shape[1]])


def _table_rows(seed: int, table: str, rows: int, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of `table`'s initial weights (a new tensor; see _fill_table_rows)."""
    out = torch.empty(stop - start, dim)
    _fill_table_rows(out, seed, table, rows, dim, start)
    return out


@torch.no_grad()
def apply_table_init(dmp: DistributedModelParallel, seed: int) -> None:
    """Give every table the same initial rows whatever its sharding and the world size, in place.

    TorchRec initialises each shard from its rank's random stream, so a row-wise table on 2 ranks
    would start from other values than on 1 rank; this makes runs comparable across layouts.
    """
    for name, tensor in dmp.state_dict().items():
        if ".embedding_bags." not in name or not name.endswith(".weight"):
            continue
        table = name.split(".")[-2]
        rows, dim = tensor.size()
        if isinstance(tensor, ShardedTensor):
            for shard in tensor.local_shards():
                r0, c0 = shard.metadata.shard_offsets
                _fill_table_rows(shard.tensor, seed, table, rows, dim, r0, c0)
        else:
            _fill_table_rows(tensor, seed, table, rows, dim, 0)


# ---- checkpoint support --------------------------------------------------------------------------

def sharding_types(dmp: DistributedModelParallel) -> dict[str, str]:
    """The sharding type of every table in the applied plan."""
    return {table: ps.sharding_type for module_plan in dmp.plan.plan.values() for table, ps in module_plan.items()}


def table_state_layout(optimizer_state: dict, tables: list[str]) -> dict[str, dict[str, list[int]]]:
    """Per table, its optimizer-state entries (key -> global shape) as they would be checkpointed.

    Fused (fbgemm) and torch optimizers keep differently named and shaped state for the same table
    (momentum1 [rows] vs exp_avg/exp_avg_sq [rows, dim], or a column-wise table's state sized by its
    shard count), so two runs can exchange a table's optimizer state only if its layouts are equal.
    Collective: a rank holds the state of its own shards only, so the layouts of all ranks are merged.
    """
    layout: dict[str, dict[str, list[int]]] = {t: {} for t in tables}
    for param_key, entries in optimizer_state["state"].items():
        table = param_key.split(".")[-2]
        kind = param_key.split(".", 1)[0]  # "fused" or "tables" (build_sparse_optimizer)
        for key, value in entries.items():
            name = key.removeprefix(f"{table}.")
            layout[table][f"{kind}:{name}"] = list(value.size()) if hasattr(value, "size") else []
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
        dist.all_gather_object(gathered, layout)
        for other in gathered:
            for table, entries in other.items():
                layout[table].update(entries)
    return {table: dict(sorted(entries.items())) for table, entries in layout.items()}


def init_table_optimizer_state(optimizer: CombinedOptimizer) -> None:
    """Create the lazily created state of torch-stepped (data-parallel) tables so a checkpoint can load into it.

    TorchRec's init_state runs one step on zero gradients: Adam, Adagrad and SGD leave the weights
    unchanged by it (tables have no weight decay), and every state entry it creates is then overwritten.
    """
    for name, part in optimizer.optimizers:
        if name == "tables" and not part.state:
            part.init_state()
            part.zero_grad()
