"""FS-RankNet (FS-LTR; METHOD.md section 4): per model, an item beats every item that left earlier.

Pairs are stage-group pairs: item i in group g against item j in any later group (group = position //
group_size; the ground-truth group first, the earliest-dropped group last); loss −log σ(s_i − s_j).
Each group's pairs form one term with its own mean, as the research code (one normalised term per
group), and the terms are summed; the total sums the models.

Choice where METHOD.md is open: each term is a mean over the request's real pairs, then over the requests
that have such pairs (the research code divided by the batch's pair count with only i masked).
"""

from __future__ import annotations

import torch

from lcron_dist.losses.base import (
    Candidates,
    CascadeLoss,
    LossOutput,
    batch_mean,
    output,
    pairwise_logistic,
    real_pairs,
)


class FSRankNetLoss(CascadeLoss):
    """Σ over models and groups of the pairwise logistic loss against every later-dropped item."""

    def compute(self, scores: list[torch.Tensor], cands: Candidates) -> LossOutput:
        batch = cands.mask.shape[0]
        groups, size = self.layout.num_groups, self.layout.group_size
        group = cands.position // size  # [N]
        pairs = real_pairs(cands.mask) & (group.view(-1, 1) < group.view(1, -1))  # [B, N, N]
        counts = pairs.sum(dim=2).view(batch, groups, size).sum(dim=2)  # [B, G] pairs per (request, group of i)
        parts = {}
        for name, s in zip(self.stage_names, scores):
            sums = torch.where(pairs, pairwise_logistic(s), 0).sum(dim=2).view(batch, groups, size).sum(dim=2)
            per_group = batch_mean(sums / counts.clamp(min=1), counts > 0)  # [G]; the last group has no pair
            parts[f"ranknet/{name}"] = per_group.sum()
        return output(torch.stack(list(parts.values())).sum(), parts)
