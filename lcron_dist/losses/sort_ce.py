"""NeuralSort-only / SoftSort-only: cross-entropy between each model's permutation and the labels'.

Choices where METHOD.md is open, each an option:
- The cross-entropy is averaged over the request's real cells (k ≤ n_b, j real), as the research code's
  ARF L_global (mean over rows and columns of −L·log(P̂ + ε)); it is also ARF's L_global here.
- The label permutation is the exact tie-aware one (`sorting.label_permutation`).
- tau defaults to LCRON's 50, so this baseline differs from LCRON only in the loss (METHOD.md gives
  no value for it).
- One loss per model, summed, like the other per-model baselines.
"""

from __future__ import annotations

import torch

from lcron_dist.data import schema
from lcron_dist.losses import sorting
from lcron_dist.losses.base import Candidates, CascadeLoss, LossOutput, batch_mean, output, request_mean


def permutation_cross_entropy(
    perm: torch.Tensor, label_perm: torch.Tensor, mask: torch.Tensor, eps: float
) -> torch.Tensor:
    """Per-request mean of −L[k, j]·log(P̂[k, j] + ε) over the real cells.

    Args:
        perm: [B, N, N] model permutation.
        label_perm: [B, N, N] label permutation.
        mask: [B, N] bool, real items.
        eps: ε inside the log.

    Returns:
        [B]; 0 for a request without real items.
    """
    real_rows = torch.arange(mask.shape[1], device=mask.device) < mask.sum(dim=1, keepdim=True)  # [B, N]
    cells = real_rows.unsqueeze(2) & mask.unsqueeze(1)  # [B, k, j]
    return request_mean(-label_perm * torch.log(perm + eps), cells)


class PermutationCELoss(CascadeLoss):
    """Σ over models of the permutation cross-entropy; subclasses fix the sorting operator."""

    sort_name = ""

    def __init__(
        self, num_stages: int, tau: float = 50.0, eps: float = 1e-6, group_size: int = schema.GROUP_SIZE
    ) -> None:
        """Build the loss.

        Args:
            num_stages: 2 or 3.
            tau: temperature of the sorting operator.
            eps: ε inside the log.
            group_size: items per candidate group.
        """
        super().__init__(num_stages, group_size)
        if tau <= 0 or eps <= 0:
            raise ValueError(f"tau and eps must be > 0, got tau={tau}, eps={eps}")
        self.sort = sorting.get_sort_op(self.sort_name)
        self.tau, self.eps = tau, eps

    def compute(self, scores: list[torch.Tensor], cands: Candidates) -> LossOutput:
        label_perm = sorting.label_permutation(cands.relevance, cands.mask, scores[0].dtype)  # [B, N, N]
        valid = cands.num_real > 0
        parts = {
            f"ce/{name}": batch_mean(
                permutation_cross_entropy(self.sort(s, self.tau, cands.mask), label_perm, cands.mask, self.eps), valid
            )
            for name, s in zip(self.stage_names, scores)
        }
        return output(torch.stack(list(parts.values())).sum(), parts)


class NeuralSortOnlyLoss(PermutationCELoss):
    """Permutation cross-entropy with NeuralSort."""

    sort_name = "neuralsort"


class SoftSortOnlyLoss(PermutationCELoss):
    """Permutation cross-entropy with SoftSort."""

    sort_name = "softsort"
