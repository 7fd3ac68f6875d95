"""FS-LambdaLoss (FS-LTR; METHOD.md section 4): listwise LambdaLoss with NDCG-Loss2++ weights, per model.

For a model with hard ranks r (from its own scores) and linear gains g = relevance / IDCG, every ordered
real pair (i, j) gets the detached weight |g_i − g_j|·((1 − μ)·u_ij + μ·v_ij) with
u_ij = |D(|r_i − r_j|) − D(|r_i − r_j| + 1)| when r_i ≤ n or r_j ≤ n (0 otherwise),
v_ij = |D_n(r_i) − D_n(r_j)|, D(r) = 1/ln(1 + r), D_n(r) = D(r) for r ≤ n else 0, μ the smooth fraction,
n the top-n cut, and contributes weight·BCE(s_i − s_j, [label_i > label_j]). Each request's loss is the
sum over its pairs, averaged over requests; the total sums the models.

Choices where METHOD.md is open, each an option or stated:
- As the research code, the BCE runs over all ordered pairs, so each preferred pair counts twice (once
  with target 1, once mirrored with target 0); tied pairs weigh 0.
- The log base of D does not matter: it scales IDCG and the discounts alike and cancels in the weight.
- Ranks, IDCG and the top-n cut are computed over the real items only; ties in scores are broken by
  position (argsort order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lcron_dist.data import schema
from lcron_dist.losses.base import Candidates, CascadeLoss, LossOutput, batch_mean, output, real_pairs


def _discount(rank: torch.Tensor) -> torch.Tensor:
    return 1 / torch.log1p(rank)


class FSLambdaLoss(CascadeLoss):
    """Σ over models of LambdaLoss (NDCG-Loss2++) on all candidates."""

    def __init__(
        self,
        num_stages: int,
        smooth_fraction: float = 0.8,
        topn: int = 30,
        group_size: int = schema.GROUP_SIZE,
    ) -> None:
        """Build the loss.

        Args:
            num_stages: 2 or 3.
            smooth_fraction: μ, the share of the smooth (v) discount.
            topn: n, the rank cut of the discounts.
            group_size: items per candidate group.
        """
        super().__init__(num_stages, group_size)
        if not 0 <= smooth_fraction <= 1:
            raise ValueError(f"smooth_fraction must lie in [0, 1], got {smooth_fraction}")
        if topn < 1:
            raise ValueError(f"topn must be >= 1, got {topn}")
        self.smooth_fraction, self.topn = smooth_fraction, topn

    def compute(self, scores: list[torch.Tensor], cands: Candidates) -> LossOutput:
        relevance = cands.relevance  # [B, N], 0 on padding
        positions = torch.arange(1, relevance.shape[1] + 1, device=relevance.device, dtype=relevance.dtype)
        ideal = (relevance.sort(dim=1, descending=True).values * _discount(positions)).sum(dim=1, keepdim=True)
        gain = torch.where(ideal > 0, relevance / ideal, 0)  # [B, N]
        pair_gain = (gain.unsqueeze(2) - gain.unsqueeze(1)).abs()  # [B, N, N]
        pairs = real_pairs(cands.mask)
        target = (relevance.unsqueeze(2) > relevance.unsqueeze(1)).to(relevance.dtype)  # [B, N, N]
        valid = cands.num_real > 0
        parts = {}
        for name, s in zip(self.stage_names, scores):
            weight = torch.where(pairs, pair_gain * self._pair_discount(s, cands.mask), 0)  # [B, N, N]
            pair_loss = F.binary_cross_entropy_with_logits(
                s.unsqueeze(2) - s.unsqueeze(1), target, weight=weight, reduction="none"
            )
            parts[f"lambda/{name}"] = batch_mean(pair_loss.sum(dim=(1, 2)), valid)
        return output(torch.stack(list(parts.values())).sum(), parts)

    @torch.no_grad()
    def _pair_discount(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, N, N] (1 − μ)·u + μ·v from the model's hard ranks (1-based; padded items rank last)."""
        order = scores.masked_fill(~mask, float("-inf")).argsort(dim=1, descending=True)
        rank = (order.argsort(dim=1) + 1).to(scores.dtype)  # [B, N]
        gap = (rank.unsqueeze(2) - rank.unsqueeze(1)).abs()  # [B, N, N]
        in_top = rank <= self.topn
        near_top = in_top.unsqueeze(2) | in_top.unsqueeze(1)
        # gap = 0 only on the diagonal, where D(0) is infinite: select, never multiply, around it.
        u = torch.where((gap > 0) & near_top, (_discount(gap) - _discount(gap + 1)).abs(), 0)
        top_discount = torch.where(in_top, _discount(rank), 0)  # [B, N]
        v = (top_discount.unsqueeze(2) - top_discount.unsqueeze(1)).abs()
        return (1 - self.smooth_fraction) * u + self.smooth_fraction * v
