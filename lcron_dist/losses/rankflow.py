"""RankFlow (METHOD.md section 4): each stage trained on what the stage before it selects.

S_1 = all real candidates; S_{i+1} = the top-q_i of S_i by stage i's score (hard, no gradient).
- BCE of stage i on S_i against y;
- distillation of stage i by stage i+1 on S_{i+1}: mean (s_i − sg(s_{i+1}))²;
- ranking term of stage i (weight α): split S_{i+1} by stage i+1's score into its top q_{i+1} and the
  rest, then −log σ(mean s_i over the top − mean s_i over the rest).
L = Σ BCE + distill_weight·Σ distill + rank_weight·Σ rank.

Choices where METHOD.md is open, each an option:
- quotas default to the serving quotas (30/20, 40/30/20), as the research code's top-k selections.
- rank_weight (α) defaults to what each research script ran: 0 for 2 stages (it weighed the distillation
  1 − α = 1), 1 for 3 stages (where distillation and ranking terms both weigh 1).
- The ranking term splits by the later stage's own quota (the 3-stage code: 30 of 40, 20 of 30; the
  2-stage code, unused at α = 0, split 10 of 30).
- Means are per request over its selected real items, then over requests.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lcron_dist.data import schema
from lcron_dist.losses.base import (
    Candidates,
    CascadeLoss,
    LossOutput,
    batch_mean,
    output,
    request_mean,
)
from lcron_dist.losses.bce import bce_per_item
from lcron_dist.metrics.recall import top_m_mask

_DEFAULT_RANK_WEIGHT = {2: 0.0, 3: 1.0}


class RankFlowLoss(CascadeLoss):
    """BCE per stage on the previous stage's selection, with distillation from the next stage."""

    def __init__(
        self,
        num_stages: int,
        quotas: Sequence[int] | None = None,
        distill_weight: float = 1.0,
        rank_weight: float | None = None,
        group_size: int = schema.GROUP_SIZE,
    ) -> None:
        """Build the loss.

        Args:
            num_stages: 2 or 3.
            quotas: items each stage keeps; default the serving quotas.
            distill_weight: weight of the distillation terms.
            rank_weight: α, weight of the ranking terms; default 0 (2 stages) or 1 (3 stages).
            group_size: items per candidate group.
        """
        super().__init__(num_stages, group_size)
        self.quotas = tuple(self.layout.per_stage(quotas, self.layout.serving_quotas, "quotas"))
        if not all(1 <= q <= self.layout.num_items for q in self.quotas):
            raise ValueError(f"quotas must lie in [1, {self.layout.num_items}], got {self.quotas}")
        self.distill_weight = distill_weight
        self.rank_weight = _DEFAULT_RANK_WEIGHT[num_stages] if rank_weight is None else rank_weight

    def compute(self, scores: list[torch.Tensor], cands: Candidates) -> LossOutput:
        names = self.stage_names
        selected = cands.mask  # [B, N], S_1
        parts: dict[str, torch.Tensor] = {}
        total = []
        for i, s in enumerate(scores):
            if i > 0:
                student, teacher = scores[i - 1], s
                selected = top_m_mask(student, selected, self.quotas[i - 1])  # what stage i - 1 passes on
                distill = (student - teacher.detach()).square()
                parts[f"distill/{names[i - 1]}"] = batch_mean(request_mean(distill, selected), selected.any(dim=1))
                total.append(self.distill_weight * parts[f"distill/{names[i - 1]}"])
                if self.rank_weight:
                    parts[f"rank/{names[i - 1]}"] = self._rank_term(student, teacher, selected, self.quotas[i])
                    total.append(self.rank_weight * parts[f"rank/{names[i - 1]}"])
            parts[f"bce/{names[i]}"] = batch_mean(request_mean(bce_per_item(s, cands), selected), selected.any(dim=1))
            total.append(parts[f"bce/{names[i]}"])
        return output(torch.stack(total).sum(), parts)

    @staticmethod
    def _rank_term(student: torch.Tensor, teacher: torch.Tensor, selected: torch.Tensor, quota: int) -> torch.Tensor:
        """−log σ(mean student score on the teacher's top-quota − mean on the rest of the selection)."""
        top = top_m_mask(teacher, selected, quota)  # [B, N]
        rest = selected & ~top
        gap = request_mean(student, top) - request_mean(student, rest)  # [B]
        return batch_mean(-F.logsigmoid(gap), top.any(dim=1) & rest.any(dim=1))
