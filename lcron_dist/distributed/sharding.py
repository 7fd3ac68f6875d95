"""TorchRec: plan and apply the sharding of every stage's embedding tables, and their optimizer."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from lcron_dist.config.job_config import JobConfig


def table_names(model: nn.Module) -> list[str]:
    """Every embedding table of the model (EmbeddingBagConfig names)."""
    return [t.name for module in model.modules() if hasattr(module, "embedding_bag_configs")
            for t in module.embedding_bag_configs()]


def plan_sharding(model: nn.Module, config: JobConfig, device: torch.device, world_size: int) -> ShardingPlan:
    """TorchRec's planner, constrained to the configured sharding type."""
    constraints = {name: ParameterConstraints(sharding_types=[config.parallelism.sharding]) for name in table_names(model)}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world_size, compute_device=device.type), constraints=constraints,
    )
    return planner.collective_plan(model, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)


def apply_sharding(model: nn.Module, config: JobConfig, device: torch.device, world_size: int,
                   dense_prefix: str = "dense.") -> tuple[DistributedModelParallel, ShardingPlan]:
    """Shard the embedding tables; the dense part is left to DeepSpeed (DDP ignores it)."""
    plan = plan_sharding(model, config, device, world_size)
    dense_names = [name for name, _ in model.named_parameters() if name.startswith(dense_prefix)]
    dmp = DistributedModelParallel(
        model, device=device, plan=plan, sharders=[EmbeddingBagCollectionSharder()],
        data_parallel_wrapper=DefaultDataParallelWrapper(params_to_ignore=dense_names),
    )
    return dmp, plan


def build_sparse_optimizer(dmp: DistributedModelParallel, config: JobConfig, dense_prefix: str = "dense.") -> KeyedOptimizer:
    """Fused (in-backward) table optimizers plus Adam for tables TorchRec leaves unfused (data-parallel)."""
    unfused = {name: p for name, p in in_backward_optimizer_filter(dmp.named_parameters())
               if dense_prefix not in name}
    optimizers: list[tuple[str, KeyedOptimizer]] = [("fused", dmp.fused_optimizer)]
    if unfused:
        optimizers.append(("tables", KeyedOptimizerWrapper(
            unfused, lambda params: torch.optim.Adam(params, lr=config.optim.lr))))
    return CombinedOptimizer(optimizers)
