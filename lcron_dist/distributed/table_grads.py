"""Data-parallel tables' gradients in a world of one: no DistributedDataParallel around their lookups.

TorchRec wraps every data-parallel table lookup in DistributedDataParallel, even in a world of one, where
DDP only costs: each step its reducer copies every table's gradient (fbgemm's backward returns it for the
whole table: 36 MB per stage of recflow-2stage) into its bucket, and its default hook all-reduces that
bucket with itself and divides it by 1. In a world of one the lookups are unwrapped once sharded, so
fbgemm's gradient becomes the tables' `.grad` as it is. TorchRec reaches a data-parallel lookup's module
through the DDP wrapper only while building the sharded collection; afterwards it unwraps DDP where
present (state dict, purge), so an unwrapped lookup serves it alike.

With more ranks DDP's own all-reduce stays. Exchanging only the rows a batch touched (gathering every
rank's non-zero rows in a hook) was tried and measured slower on gloo, for 114k and for 1.1M rows per
stage: DDP's all-reduce runs asynchronously beside the rest of the backward, the gather could not.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection


def unwrap_single_rank_lookups(model: nn.Module) -> int:
    """In a world of one, replace every DDP-wrapped data-parallel table lookup in `model` by its module.

    Returns:
        The number of lookups unwrapped (0 with more than one rank).
    """
    unwrapped = 0
    for module in model.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            for i, lookup in enumerate(module._lookups):
                if isinstance(lookup, DistributedDataParallel) and dist.get_world_size(lookup.process_group) == 1:
                    module._lookups[i] = lookup.module
                    unwrapped += 1
    return unwrapped
