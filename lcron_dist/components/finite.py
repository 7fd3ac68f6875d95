"""The guard against non-finite training: every rank stops before a NaN or infinite loss reaches a weight."""

from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteLoss(RuntimeError):
    """A rank's loss was NaN or infinite; no rank has stepped on that batch."""


def check_finite_loss(loss: torch.Tensor) -> None:
    """Raise NonFiniteLoss on every rank when any rank's `loss` is not finite.

    Called between a step's forward and its backward: one all-reduce of one value per step (the
    ranks must agree, as a rank that stopped alone would leave the others waiting in a collective).

    Raises:
        NonFiniteLoss: naming the ranks whose loss was not finite.
    """
    bad = (~torch.isfinite(loss.detach())).reshape(1).to(torch.float32)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        flags = bad.new_zeros(world)
        flags[dist.get_rank()] = bad
        dist.all_reduce(flags)
    else:
        flags = bad
    ranks = flags.nonzero().flatten().tolist()
    if ranks:
        raise NonFiniteLoss(f"the loss is not finite on rank{'s' if len(ranks) > 1 else ''} "
                            f"{', '.join(map(str, ranks))}")
