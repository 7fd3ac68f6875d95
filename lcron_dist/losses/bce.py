"""BCE baseline (METHOD.md section 4): each model trained alone on what it was shown in production.

y = 1 for the ground-truth group. Stage i is trained on its leading `seen_groups[i]` groups: 2-stage
retrieval on all 4 groups (40 items), ranking on the first 2 (rank_pos vs rank_neg); 3-stage retrieval on
all 5, pre-ranking on the first 4, ranking on the first 2 (rerank_pos vs rerank_neg).

Choice where METHOD.md is open: the mean is taken per request over its real seen items, then over the
requests (the research code's `weight=mask, reduction='mean'` also divided by the padded entries).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lcron_dist.data import schema
from lcron_dist.losses.base import Candidates, CascadeLoss, LossOutput, batch_mean, output, request_mean


def bce_per_item(scores: torch.Tensor, cands: Candidates) -> torch.Tensor:
    """[B, N] binary cross-entropy of each item's logit against y (reduced by the caller)."""
    return F.binary_cross_entropy_with_logits(scores, cands.target.to(scores.dtype), reduction="none")


class StagewiseBCELoss(CascadeLoss):
    """Σ over models of a pointwise BCE on the groups that model saw in production."""

    def __init__(
        self, num_stages: int, seen_groups: Sequence[int] | None = None, group_size: int = schema.GROUP_SIZE
    ) -> None:
        """Build the loss.

        Args:
            num_stages: 2 or 3.
            seen_groups: leading groups each stage is trained on; default (4, 2) or (5, 4, 2).
            group_size: items per candidate group.
        """
        super().__init__(num_stages, group_size)
        default = [n // group_size for n in self.layout.seen_items]
        groups = self.layout.per_stage(seen_groups, default, "seen_groups")
        if not all(1 <= g <= self.layout.num_groups for g in groups):
            raise ValueError(f"seen_groups must lie in [1, {self.layout.num_groups}], got {groups}")
        self.seen_items = tuple(g * group_size for g in groups)

    def compute(self, scores: list[torch.Tensor], cands: Candidates) -> LossOutput:
        parts = {}
        for name, s, seen in zip(self.stage_names, scores, self.seen_items):
            shown = cands.mask & (cands.position < seen)  # [B, N]
            parts[f"bce/{name}"] = batch_mean(request_mean(bce_per_item(s, cands), shown), shown.any(dim=1))
        return output(torch.stack(list(parts.values())).sum(), parts)
