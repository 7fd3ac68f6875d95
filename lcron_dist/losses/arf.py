"""ARF and ARF-v2 (METHOD.md section 4): a relaxed top-m recall term plus a global sorting term, per model.

Per model i with quota m_i: L_i = L_global/(2w_i²) + ln w_i + L_relax, with one learned w_i (init 1),
as the research code combines them; the total sums the models.
- ARF's L_relax: −y_j·log(mean_{k≤m} P̂[k, j] + ε), averaged over the real items.
- ARF-v2's L_relax: LCRON's single-stage BCE form with the row cut at m (the label cut stays the ground
  truth: y and 1 − y), as the research code's "ultra" relax loss.
- L_global: the permutation cross-entropy of `sort_ce` against the exact label permutation.

Choices where METHOD.md is open, each an option:
- m defaults to the stage's serving quota (2-stage 30/20, 3-stage 40/30/20).
- L_relax counts requests with more than m real items (the research code's `count > m` factor);
  L_global counts every request with a real item, on its real rows and columns (the research code
  dropped any request with padding from it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lcron_dist.data import schema
from lcron_dist.losses import sorting
from lcron_dist.losses.base import (
    Candidates,
    CascadeLoss,
    LossOutput,
    batch_mean,
    output,
    request_mean,
    uncertainty_term,
)
from lcron_dist.losses.lcron import column_mass, cut_probabilities, single_stage_loss
from lcron_dist.losses.sort_ce import permutation_cross_entropy


class ARFLoss(CascadeLoss):
    """ARF: L_relax (mean of the top-m rows for ground-truth columns) + uncertainty-weighted L_global."""

    def __init__(
        self,
        num_stages: int,
        tau: float = 200.0,
        m: int | Sequence[int] | None = None,
        sort: str = "neuralsort",
        eps: float = 1e-6,
        group_size: int = schema.GROUP_SIZE,
    ) -> None:
        """Build the loss.

        Args:
            num_stages: 2 or 3.
            tau: temperature of the sorting operator.
            m: relaxed-recall quota per stage (an int for all); default the serving quotas.
            sort: "neuralsort" or "softsort".
            eps: ε inside the logs.
            group_size: items per candidate group.
        """
        super().__init__(num_stages, group_size)
        self.sort = sorting.get_sort_op(sort)
        self.m = tuple(self.layout.per_stage(m, self.layout.serving_quotas, "m"))
        if tau <= 0 or eps <= 0:
            raise ValueError(f"tau and eps must be > 0, got tau={tau}, eps={eps}")
        if not all(1 <= quota < self.layout.num_items for quota in self.m):
            raise ValueError(f"m must lie in [1, {self.layout.num_items}), got {self.m}")
        self.tau, self.eps = tau, eps
        self.global_weights = nn.Parameter(torch.ones(num_stages))

    def compute(self, scores: list[torch.Tensor], cands: Candidates) -> LossOutput:
        label_perm = sorting.label_permutation(cands.relevance, cands.mask, scores[0].dtype)  # [B, N, N]
        parts: dict[str, torch.Tensor] = {}
        totals = []
        for name, s, quota, weight in zip(self.stage_names, scores, self.m, self.global_weights):
            perm = self.sort(s, self.tau, cands.mask)  # [B, N, N]
            relax = self.relax(perm, quota, cands)
            ce = permutation_cross_entropy(perm, label_perm, cands.mask, self.eps)
            glob = batch_mean(ce, cands.num_real > 0)
            parts[f"relax/{name}"], parts[f"global/{name}"] = relax, glob
            totals.append(uncertainty_term(glob, weight) + relax)
        return output(torch.stack(totals).sum(), parts)

    def relax(self, perm: torch.Tensor, quota: int, cands: Candidates) -> torch.Tensor:
        """ARF's L_relax of one model (scalar)."""
        top_share = perm[:, :quota].sum(dim=1) / quota  # [B, N]: mean of the top-m rows
        item = -cands.target.to(perm.dtype) * torch.log(top_share + self.eps)
        return batch_mean(request_mean(item, cands.mask), cands.num_real > quota)


class ARFV2Loss(ARFLoss):
    """ARF-v2: ARF with L_relax replaced by LCRON's single-stage BCE form at the stage quota."""

    def relax(self, perm: torch.Tensor, quota: int, cands: Candidates) -> torch.Tensor:
        y, negative = cands.target.to(perm.dtype), cands.negative.to(perm.dtype)
        return single_stage_loss(*cut_probabilities(perm, column_mass(perm, self.eps), quota), quota, y, negative, cands,
                                 self.eps)
