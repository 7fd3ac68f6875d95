"""LCRON: the cascade trained as one network (METHOD.md section 3).

Choices where METHOD.md is open, each an option:
- q defaults to K = |CS_gt| = one group (10) for every stage, the paper's training setting, not the
  serving quotas.
- Validity: L_single^i counts requests with more than K real items (as the research code's
  `count > K` factor; with fewer, "below rank K" is empty and the negative term a constant −log ε);
  L_e2e counts requests with more real items than the smallest q, since otherwise every stage keeps
  every item and the loss is a constant without gradient. Both then average over those requests.
- weighting: "uwl" is the research code (L_e2e + Σ L_single^i/(2w_i²) + ln Π w_i), "uwl_paper" Eq. 13
  (L_e2e/(2α²) + Σ L_single^i/(2w_i²) + log2(α Π w_i)), "fixed" uses `fixed_weights` (e2e first, then
  one per stage; default 1 and 0.5 each, i.e. "uwl" at initialisation). Only the weights a configuration
  uses are created, so an ablation leaves no parameter without gradient.
- binarized_labels reproduces the 3-stage research code's quirk (section 10): L_single's targets come
  from the binarised label permutation, so a negative's "down" target is its tie group's size.
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

WEIGHTINGS = ("uwl", "uwl_paper", "fixed")


def column_mass(perm: torch.Tensor, eps: float) -> torch.Tensor:
    """c_j + ε with c_j = sg(Σ_k P̂[k, j]): the normaliser of LCRON's selection probabilities.

    Args:
        perm: [B, N, N] relaxed permutation.
        eps: ε.

    Returns:
        [B, N], detached: the gradient must flow through the selected rows only (METHOD.md section 3).
    """
    return perm.detach().sum(dim=1) + eps


def cut_probabilities(perm: torch.Tensor, mass: torch.Tensor, cut: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised mass above and below a rank cut.

    Args:
        perm: [B, N, N] relaxed permutation.
        mass: [B, N] from `column_mass`.
        cut: q: rows 1..q are "selected".

    Returns:
        (a, r), each [B, N]: a_j = Σ_{k≤q} P̂[k, j] / (c_j + ε) (the "up" path) and
        r_j = Σ_{k>q} P̂[k, j] / (c_j + ε), so that b_j = 1 − r_j is the "down" path: the same
        probability, with its gradient through the rows below the cut.
    """
    return perm[:, :cut].sum(dim=1) / mass, perm[:, cut:].sum(dim=1) / mass


def single_stage_loss(
    up: torch.Tensor,
    down: torch.Tensor,
    cut: int,
    pos_weight: torch.Tensor,
    neg_weight: torch.Tensor,
    cands: Candidates,
    eps: float,
) -> torch.Tensor:
    """L_single of one stage: −y·log(a(cut) + ε) − (1 − y)·log(r(cut) + ε), mean over real items.

    Args:
        up, down: [B, N] each, the stage's `cut_probabilities` at `cut`.
        cut: row cut (K for LCRON, the stage quota m for ARF-v2).
        pos_weight: [B, N] weight of the "up" term (y).
        neg_weight: [B, N] weight of the "down" term (real and not y).
        cands: label view.
        eps: ε.

    Returns:
        Scalar: mean over the requests with more than `cut` real items.
    """
    item = -pos_weight * torch.log(up + eps) - neg_weight * torch.log(down + eps)  # [B, N]
    return batch_mean(request_mean(item, cands.mask), cands.num_real > cut)


class LCRONLoss(CascadeLoss):
    """L_e2e (cascade survival BCE) + one L_single per stage, combined by uncertainty weighting."""

    def __init__(
        self,
        num_stages: int,
        tau: float = 50.0,
        q: int | Sequence[int] | None = None,
        k: int | None = None,
        sort: str = "neuralsort",
        weighting: str = "uwl",
        fixed_weights: Sequence[float] | None = None,
        use_e2e: bool = True,
        use_single: bool = True,
        eps: float = 1e-6,
        binarized_labels: bool = False,
        group_size: int = schema.GROUP_SIZE,
    ) -> None:
        """Build the loss.

        Args:
            num_stages: 2 or 3.
            tau: temperature of the sorting operator.
            q: training cut per stage (an int for all); default K.
            k: K = |CS_gt|, the cut of L_single; default one group (10).
            sort: "neuralsort" or "softsort".
            weighting: "uwl" (research code), "uwl_paper" (Eq. 13) or "fixed".
            fixed_weights: with "fixed": weight of L_e2e, then one per stage's L_single.
            use_e2e: keep L_e2e (False = the "without L_e2e" ablation).
            use_single: keep the L_single terms (False = the "without L_single" ablation).
            eps: ε of the normaliser and the logs.
            binarized_labels: reproduce the 3-stage research code's binarised L_single targets.
            group_size: items per candidate group.
        """
        super().__init__(num_stages, group_size)
        self.sort = sorting.get_sort_op(sort)
        self.k = group_size if k is None else k
        self.q = tuple(self.layout.per_stage(q, [self.k] * num_stages, "q"))
        if tau <= 0 or eps <= 0:
            raise ValueError(f"tau and eps must be > 0, got tau={tau}, eps={eps}")
        if not all(1 <= cut < self.layout.num_items for cut in (self.k, *self.q)):
            raise ValueError(f"k and q must lie in [1, {self.layout.num_items}), got k={self.k}, q={self.q}")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; valid: {list(WEIGHTINGS)}")
        if not (use_e2e or use_single):
            raise ValueError("use_e2e and use_single cannot both be False")
        if fixed_weights is not None and weighting != "fixed":
            raise ValueError(f"fixed_weights is only used with weighting='fixed', got weighting={weighting!r}")
        if fixed_weights is None:
            fixed_weights = (1.0,) + (0.5,) * num_stages
        if len(fixed_weights) != 1 + num_stages:
            raise ValueError(f"fixed_weights needs 1 + {num_stages} values (e2e, then per stage), got {fixed_weights}")
        self.tau, self.eps = tau, eps
        self.weighting, self.fixed_weights = weighting, tuple(float(w) for w in fixed_weights)
        self.use_e2e, self.use_single = use_e2e, use_single
        self.binarized_labels = binarized_labels
        learned = weighting != "fixed"
        # Learned weights, initialised to 1 and trained with the models by the dense optimiser.
        self.stage_weights = nn.Parameter(torch.ones(num_stages)) if learned and use_single else None
        # Shape [1], not []: DeepSpeed's parameter broadcast cannot view a 0-dim tensor as bytes.
        self.e2e_weight = nn.Parameter(torch.ones(1)) if weighting == "uwl_paper" and use_e2e else None

    def compute(self, scores: list[torch.Tensor], cands: Candidates) -> LossOutput:
        perms = [self.sort(s, self.tau, cands.mask) for s in scores]  # T x [B, N, N]
        masses = [column_mass(p, self.eps) for p in perms]  # T x [B, N]
        # Each stage's cut probabilities once per cut used: with q = K (the default) L_e2e and L_single share
        # them (forward + backward at B = 1,024, N = 40, 2 stages, CPU: 96 -> 83 ms, medians of 10).
        cuts = {(i, q) for i, q in enumerate(self.q) if self.use_e2e}
        cuts |= {(i, self.k) for i in range(len(perms)) if self.use_single}
        probabilities = {(i, cut): cut_probabilities(perms[i], masses[i], cut) for i, cut in sorted(cuts)}
        y = cands.target.to(scores[0].dtype)
        parts: dict[str, torch.Tensor] = {}
        if self.use_e2e:
            survive = torch.ones_like(y)  # Π_i a_i,j(q_i)
            kept = torch.ones_like(y)  # Π_i b_i,j(q_i)
            for i, cut in enumerate(self.q):
                up, down = probabilities[i, cut]
                survive, kept = survive * up, kept * (1 - down)
            item = -y * torch.log(survive + self.eps) - (1 - y) * torch.log(1 - kept + self.eps)  # [B, N]
            parts["e2e"] = batch_mean(request_mean(item, cands.mask), cands.num_real > min(self.q))
        if self.use_single:
            pos_weight, neg_weight = self._single_targets(cands, y)
            for i, name in enumerate(self.stage_names):
                parts[f"single/{name}"] = single_stage_loss(*probabilities[i, self.k], self.k, pos_weight, neg_weight,
                                                            cands, self.eps)
        return output(self._combine(parts), parts)

    def _single_targets(self, cands: Candidates, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) targets of L_single: y and 1 − y on real items, or the research quirk's counts."""
        if not self.binarized_labels:
            return y, cands.negative.to(y.dtype)
        blocks = (sorting.label_permutation(cands.relevance, cands.mask) > 0).to(y.dtype)  # [B, N, N]
        return blocks[:, : self.k].sum(dim=1), blocks[:, self.k :].sum(dim=1)

    def _combine(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        singles = [parts[f"single/{name}"] for name in self.stage_names] if self.use_single else []
        e2e = parts.get("e2e")
        if self.weighting == "fixed":
            terms = [w * s for w, s in zip(self.fixed_weights[1:], singles)]
            if e2e is not None:
                terms.append(self.fixed_weights[0] * e2e)
            return torch.stack(terms).sum()
        log = torch.log if self.weighting == "uwl" else torch.log2
        terms = [uncertainty_term(s, w, log) for s, w in zip(singles, self.stage_weights)] if singles else []
        if e2e is not None:
            terms.append(e2e if self.e2e_weight is None else uncertainty_term(e2e, self.e2e_weight[0], log))
        return torch.stack(terms).sum()
