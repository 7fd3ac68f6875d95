"""ICC (Gallagher et al., 2019; METHOD.md section 4): a pairwise loss on the cascade's fused score.

Stage i's soft survival indicator is I_i = σ((s_i − κ_i(s_i)) / σ_I), κ_i = the cutoff-th largest real
score. The fused score credits each item to the stage that drops it:
f = Σ_{i<T} scale_i·(Π_{j<i} I_j)·(1 − I_i)·s_i + scale_T·(Π_{j≤T} I_j)·s_T,
i.e. (1 − I_R)·s_R + I_R·I_P·s_P for 2 stages. Loss: −log σ(f_i − f_j) over real pairs with label_i > label_j.

Choices where METHOD.md is open, each an option:
- cutoffs default to the serving quotas (30/20, 40/30/20); the research code used 30/30 and 40/30/30.
- stage_scales default to 1; the 3-stage research code scaled the stage terms by (1, 2, 4).
- Pairs use the graded relevance (graded=True, as the research code: positives ordered among themselves,
  later-stage negatives above earlier ones); graded=False uses binary y. Only pairs with a strict
  preference count (the research code also pushed tied pairs apart, in position order).
- Mean over each request's pairs, then over requests. κ keeps its gradient, as in the research code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lcron_dist.data import schema
from lcron_dist.losses.base import (
    Candidates,
    CascadeLoss,
    LossOutput,
    batch_mean,
    output,
    pairwise_logistic,
    real_pairs,
    request_mean,
)


def kth_largest(scores: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """[B, 1] the k-th largest real score; −inf where a request has fewer than k real items (all pass)."""
    return scores.masked_fill(~mask, float("-inf")).topk(k, dim=1).values[:, -1:]


class ICCLoss(CascadeLoss):
    """Pairwise logistic loss on ICC's indicator-fused cascade score."""

    def __init__(
        self,
        num_stages: int,
        sigma: float = 1e-3,
        cutoffs: int | Sequence[int] | None = None,
        stage_scales: float | Sequence[float] | None = None,
        graded: bool = True,
        group_size: int = schema.GROUP_SIZE,
    ) -> None:
        """Build the loss.

        Args:
            num_stages: 2 or 3.
            sigma: σ_I, the indicators' temperature.
            cutoffs: κ's rank per stage; default the serving quotas.
            stage_scales: factor of each stage's term in f; default 1.
            graded: pairs by graded relevance (True) or by binary y (False).
            group_size: items per candidate group.
        """
        super().__init__(num_stages, group_size)
        if sigma <= 0:
            raise ValueError(f"sigma must be > 0, got {sigma}")
        self.cutoffs = tuple(self.layout.per_stage(cutoffs, self.layout.serving_quotas, "cutoffs"))
        if not all(1 <= c <= self.layout.num_items for c in self.cutoffs):
            raise ValueError(f"cutoffs must lie in [1, {self.layout.num_items}], got {self.cutoffs}")
        self.stage_scales = tuple(self.layout.per_stage(stage_scales, [1.0] * num_stages, "stage_scales"))
        self.sigma, self.graded = sigma, graded

    def compute(self, scores: list[torch.Tensor], cands: Candidates) -> LossOutput:
        fused = torch.zeros_like(scores[0])  # [B, N]
        passed = torch.ones_like(scores[0])  # Π_{j<i} I_j
        last = len(scores) - 1
        for i, (s, cutoff, scale) in enumerate(zip(scores, self.cutoffs, self.stage_scales)):
            indicator = torch.sigmoid((s - kth_largest(s, cands.mask, cutoff)) / self.sigma)
            share = indicator if i == last else 1 - indicator
            fused = fused + scale * passed * share * s
            passed = passed * indicator
        label = cands.relevance if self.graded else cands.target.to(fused.dtype)
        pairs = real_pairs(cands.mask) & (label.unsqueeze(2) > label.unsqueeze(1))  # [B, N, N]
        loss = batch_mean(request_mean(pairwise_logistic(fused), pairs), pairs.flatten(1).any(dim=1))
        return output(loss, {"pairwise": loss})
