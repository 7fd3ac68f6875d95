"""How data-parallel tables' gradients cross ranks on CPU: only the rows a rank touched.

TorchRec wraps every data-parallel table lookup in DistributedDataParallel, whose default hook
all-reduces the whole gradient: every row of every table, each step, though a batch touches a few
percent of them (the other rows' gradients are exactly zero). Over gloo that all-reduce is most of a
two-rank step's communication. `touched_rows_hook` sends instead the rows (blocks of `width` values)
that hold a non-zero, gathers every rank's, and sums them in rank order, so every rank ends with the
same bits; each is scaled by 1 / world size as it is added (DDP's average). In a world of one it
returns the gradient untouched (DDP would still divide it by 1, a pass over every table).

On CUDA, NCCL's all-reduce of the dense gradient stays (selected by device in register_table_grad_hooks).
(No `from __future__ import annotations` here: DDP checks the hook's annotations as objects.)
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.profiler import record_function
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection


class TouchedRows:
    """DDP hook state: the process group and the row width (embedding dim) of the bucket's tables."""

    def __init__(self, process_group: dist.ProcessGroup, width: int) -> None:
        self.process_group, self.width = process_group, width


EXCHANGE = "lcron/table_grads"
"""Profiler range of the exchange (tools/bench_scaling.py counts it as communication)."""


def touched_rows_hook(state: TouchedRows, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average `bucket`'s gradient over ranks, exchanging only its non-zero rows."""
    grad = bucket.buffer()
    world = dist.get_world_size(state.process_group)
    if world > 1:
        with record_function(EXCHANGE):
            average_touched_rows(grad, state, world)
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(grad)
    return future


def average_touched_rows(grad: torch.Tensor, state: TouchedRows, world: int) -> None:
    """grad ← Σ_r grad_r / world over the ranks, in place, through the rows that hold a non-zero."""
    width = state.width if grad.numel() % state.width == 0 else 1
    rows = grad.view(-1, width)
    touched = rows.ne(0).any(1).nonzero().squeeze(1)
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([touched.numel()]), group=state.process_group)
    most = int(max(counts).item())
    index = torch.zeros(most, dtype=torch.int64)
    index[: touched.numel()] = touched
    values = rows.new_zeros(most, width)
    torch.index_select(rows, 0, touched, out=values[: touched.numel()])
    indices = [torch.empty_like(index) for _ in range(world)]
    blocks = [torch.empty_like(values) for _ in range(world)]
    dist.all_gather(indices, index, group=state.process_group)
    dist.all_gather(blocks, values, group=state.process_group)
    rows.index_fill_(0, touched, 0)  # own rows are added back in rank order, like everyone else's
    for count, index, block in zip(counts, indices, blocks):
        rows.index_add_(0, index[: int(count)], block[: int(count)], alpha=1 / world)


def register_table_grad_hooks(model: nn.Module, width: int, device: torch.device) -> int:
    """Give every DDP-wrapped data-parallel table lookup in `model` the touched-rows hook (CPU only).

    Returns:
        The number of lookups hooked.
    """
    if device.type != "cpu":
        return 0
    hooked = 0
    for module in model.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            for lookup in module._lookups:
                if isinstance(lookup, DistributedDataParallel):
                    lookup.register_comm_hook(TouchedRows(lookup.process_group, width), touched_rows_hook)
                    hooked += 1
    return hooked
