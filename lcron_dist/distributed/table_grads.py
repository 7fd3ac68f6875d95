"""Data-parallel tables' gradients in a world of one: no reduction at all.

TorchRec wraps every data-parallel table lookup in DistributedDataParallel even in a world of one,
where DDP's default hook still all-reduces the gradient with itself and divides it by 1: a pass over
every row of every table each step (the profiler's `mul` over the 1.1M x 8 gradient of a stage, 4 ms
of each step on 2 CPU threads). In a world of one the hook below hands the gradient back untouched.

With more ranks DDP's own all-reduce stays. Exchanging only the rows a batch touched (gathering every
rank's non-zero rows in the hook) was tried and measured slower on gloo, for 114k and for 1.1M rows
per stage: DDP's all-reduce runs asynchronously beside the rest of the backward, the gather could not.
(No `from __future__ import annotations` here: DDP checks the hook's annotations as objects.)
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection


def keep_gradient(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """The DDP communication hook of a world of one: the bucket's gradient as it is."""
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def skip_single_rank_reduction(model: nn.Module) -> int:
    """In a world of one, give every DDP-wrapped data-parallel table lookup in `model` keep_gradient.

    Returns:
        The number of lookups given the hook (0 with more than one rank).
    """
    hooked = 0
    for module in model.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            for lookup in module._lookups:
                if isinstance(lookup, DistributedDataParallel) and dist.get_world_size(lookup.process_group) == 1:
                    lookup.register_comm_hook(None, keep_gradient)
                    hooked += 1
    return hooked
