"""Cascade losses: LCRON and every baseline of METHOD.md, one registry by name.

    from lcron_dist.losses import build_loss
    loss_fn = build_loss("lcron", num_stages=2, tau=50.0)
    out = loss_fn(scores=[s_retrieval, s_ranking], relevance=rel, mask=mask)  # each [B, N]
    out.total.backward()
    out.parts  # {"e2e": ..., "single/retrieval": ..., "single/ranking": ...}, detached

Every loss is an nn.Module; LCRON's and ARF's learned weights are its parameters, so move the loss to
the device and give its parameters to the dense optimiser with the models'.
"""

from __future__ import annotations

from typing import Any

from lcron_dist.losses.arf import ARFLoss, ARFV2Loss
from lcron_dist.losses.base import STAGE_NAMES, CascadeLayout, CascadeLoss, LossOutput
from lcron_dist.losses.bce import StagewiseBCELoss
from lcron_dist.losses.fs_lambdaloss import FSLambdaLoss
from lcron_dist.losses.fs_ranknet import FSRankNetLoss
from lcron_dist.losses.icc import ICCLoss
from lcron_dist.losses.lcron import LCRONLoss
from lcron_dist.losses.rankflow import RankFlowLoss
from lcron_dist.losses.sort_ce import NeuralSortOnlyLoss, SoftSortOnlyLoss

LOSSES: dict[str, type[CascadeLoss]] = {
    "lcron": LCRONLoss,
    "bce": StagewiseBCELoss,
    "icc": ICCLoss,
    "rankflow": RankFlowLoss,
    "fs_ranknet": FSRankNetLoss,
    "fs_lambdaloss": FSLambdaLoss,
    "arf": ARFLoss,
    "arf_v2": ARFV2Loss,
    "neuralsort_only": NeuralSortOnlyLoss,
    "softsort_only": SoftSortOnlyLoss,
}
"""Every loss by registry name."""


def build_loss(name: str, num_stages: int, **options: Any) -> CascadeLoss:
    """Build the loss called `name` for a cascade of `num_stages` stages.

    Args:
        name: registry name (see LOSSES).
        num_stages: 2 or 3.
        **options: the loss's keyword options (see its class); defaults as in METHOD.md.

    Returns:
        The loss module.

    Raises:
        ValueError: unknown name, unknown option or invalid option value.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {list(LOSSES)}")
    cls = LOSSES[name]
    valid = cls.option_names()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for loss {name!r}; valid: {valid}")
    return cls(num_stages=num_stages, **options)


__all__ = ["LOSSES", "STAGE_NAMES", "CascadeLayout", "CascadeLoss", "LossOutput", "build_loss"]
