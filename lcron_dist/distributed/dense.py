"""DeepSpeed engine for the dense parameters (towers, attention, loss weights), and their checkpoint form.

Checkpoints hold the dense state *unpartitioned*: every parameter's fp32 value and Adam state, gathered
through DeepSpeed's tensor-fragment API (safe_get_full_*), the same on every rank. DeepSpeed's own
save_checkpoint writes ZeRO 1-3 optimizer state partitioned by data-parallel rank, which loads only at
the same world size unless converted offline to a "universal checkpoint"; the dense part of a cascade
is a few MB (towers, attention, loss weights: the large state is in the TorchRec tables), so gathering
it costs little and the checkpoint loads at any world size and any ZeRO stage.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from lcron_dist.config.job_config import JobConfig
from lcron_dist.distributed.optimizers import fused_if_available

# DeepSpeed picks its accelerator at import time.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402
from deepspeed.utils import (  # noqa: E402
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)

# The shared-memory communication op is JIT-compiled with g++ at init (30-45 s) unless ruled out;
# gloo carries CPU collectives without it.
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def deepspeed_config(config: JobConfig, world_size: int, device: torch.device) -> dict:
    """The DeepSpeed JSON config derived from the job config."""
    ds: dict = {
        "train_micro_batch_size_per_gpu": config.data.batch_size,
        "train_batch_size": config.data.batch_size * world_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": config.parallelism.zero_stage},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if config.optim.grad_clip > 0:
        ds["gradient_clipping"] = config.optim.grad_clip
    return ds


def build_dense_engine(dense: nn.Module, config: JobConfig, world_size: int, device: torch.device):
    """Wrap the dense module in a DeepSpeed engine with a torch Adam/AdamW client optimizer."""
    optim_cls = torch.optim.AdamW if config.optim.name == "adamw" else torch.optim.Adam
    optimizer = fused_if_available(optim_cls, dense.parameters(), lr=config.optim.lr,
                                   weight_decay=config.optim.weight_decay)
    engine, *_ = deepspeed.initialize(model=dense, optimizer=optimizer,
                                      config=deepspeed_config(config, world_size, device))
    return engine


# ---- world-size-independent dense state ---------------------------------------------------------

def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed (ZeRO 1-3 wrap it; ZeRO-0 uses the client optimizer as is)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def dense_optimizer_step(engine) -> float:
    """The dense optimizer's step count (every state entry holds the same one; 0 before the first step)."""
    steps = {float(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"dense optimizer state entries disagree on the step count: {sorted(steps)}")
    return steps.pop() if steps else 0.0


@torch.no_grad()
def gather_dense_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Every dense parameter and its optimizer state, unpartitioned, identical on every rank.

    Collective under ZeRO 1-3 (each rank contributes its partition). Returns (weights by parameter
    name, {parameter name: {state key: tensor}}); a parameter the optimizer has not stepped yet has
    no state entry.
    """
    weights, states = {}, {}
    optimizer = _base_optimizer(engine)
    keys = sorted({k for s in optimizer.state.values() for k, v in s.items() if torch.is_tensor(v) and v.dim() > 0})
    for name, param in engine.module.named_parameters():
        if engine.zero_optimization_stage() > 0:
            weights[name] = safe_get_full_fp32_param(param).detach().clone().cpu()
            if keys:
                states[name] = {k: safe_get_full_optimizer_state(param, k).detach().clone().cpu() for k in keys}
        else:
            weights[name] = param.detach().clone().cpu()
            if param in optimizer.state:
                states[name] = {k: v.detach().clone().cpu() for k, v in optimizer.state[param].items()
                                if torch.is_tensor(v) and v.dim() > 0}
    return weights, states


def _init_optimizer_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], keys: list[str]) -> None:
    """Create the lazily created Adam/AdamW state of `params` (zeros, step 0) so it can be loaded into."""
    for p in params:
        if not optimizer.state.get(p):
            optimizer.state[p] = {"step": torch.tensor(0.0),
                                  **{k: torch.zeros_like(p, memory_format=torch.preserve_format) for k in keys}}


def _set_hp_fragment(zero_optimizer, param: torch.Tensor, value: torch.Tensor, key: str | None) -> None:
    """ZeRO 1-2: this rank's fragment of a parameter's fp32 master (key None) or optimizer state."""
    if key is None:
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


def _set_z3_partition(zero_optimizer, param: torch.Tensor, value: torch.Tensor, key: str | None) -> None:
    """ZeRO-3: this rank's partition of a parameter's fp32 master or optimizer state.

    DeepSpeed's own safe_set_full_* cuts the partition out of the unpadded value and fails on the last
    rank of a parameter whose size the world size does not divide (a 1-element loss weight on 2 ranks);
    the partition is cut here from the value padded with zeros, as ZeRO-3 pads it.
    """
    partition, _ = zero_optimizer._get_fp32_opt_state_partition(param, release_swap_buffers=False,  # noqa: SLF001
                                                                 optim_state_key=key)
    size = partition.numel()
    start = size * zero_optimizer._get_param_partition_rank(param)  # noqa: SLF001
    piece = value.flatten()[start:start + size]
    partition.zero_()
    partition[:piece.numel()].copy_(piece)


@torch.no_grad()
def load_dense_state(engine, weights: dict[str, torch.Tensor], states: dict[str, dict[str, torch.Tensor]],
                     step: float) -> None:
    """Put gathered dense state (gather_dense_state, maybe from another world size) into `engine`.

    Sets the module's weights, the fp32 master partitions and optimizer state of this rank (ZeRO 1-3),
    and the optimizer step count. Collective under ZeRO-3.
    """
    optimizer = _base_optimizer(engine)
    keys = sorted({k for s in states.values() for k in s})
    named = dict(engine.module.named_parameters())
    stage = engine.zero_optimization_stage()
    # The optimizer creates its state lazily at the first step: create it to load into.
    if stage == 0:
        _init_optimizer_state(optimizer, [named[n] for n in states], keys)
    elif stage in (1, 2):
        _init_optimizer_state(optimizer, list(engine.optimizer.single_partition_of_fp32_groups), keys)
        engine.optimizer._lazy_init_hp_params_optimizer_state()  # noqa: SLF001 (links the state fragments)
    else:
        _init_optimizer_state(optimizer, list(engine.optimizer.fp32_partitioned_groups_flat), keys)

    # The module's weights (under ZeRO-3 partitioned: gathered, set on rank 0, partitioned again).
    with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=0, enabled=stage == 3):
        if stage < 3 or engine.global_rank == 0:
            for name, param in named.items():
                param.copy_(weights[name])

    # The fp32 masters and optimizer state: the tensors themselves (ZeRO-0) or this rank's part of them.
    if stage == 0:
        for name, value in states.items():
            for key, tensor in value.items():
                optimizer.state[named[name]][key].copy_(tensor)
    else:
        set_part = _set_z3_partition if stage == 3 else _set_hp_fragment
        for name, param in named.items():
            set_part(engine.optimizer, param, weights[name].to(param.device), None)
            for key, value in states.get(name, {}).items():
                set_part(engine.optimizer, param, value.to(param.device), key)
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"].fill_(step)
        elif "step" in state:
            state["step"] = step
