"""DeepSpeed engine for the dense parameters (towers, attention, loss weights)."""

from __future__ import annotations

import os

import torch
from torch import nn

from lcron_dist.config.job_config import JobConfig

# DeepSpeed picks its accelerator at import time.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

import deepspeed  # noqa: E402

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
    optimizer = optim_cls(dense.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay)
    engine, *_ = deepspeed.initialize(model=dense, optimizer=optimizer,
                                      config=deepspeed_config(config, world_size, device))
    return engine
