"""Top-m selection and the end-to-end (joint) recall of a cascade."""

from __future__ import annotations

import torch


def top_m_mask(
    scores: torch.Tensor, eligible: torch.Tensor, m: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Select each request's top-m eligible items by score, breaking ties at random.

    Args:
        scores: [B, N] scores.
        eligible: [B, N] bool, items that may be selected (padded or already filtered items are not).
        m: how many items to keep per request; a request with fewer eligible items keeps them all.
        generator: source of the random tie-break (fixed seed for reproducible metrics).

    Returns:
        [B, N] bool mask of the kept items.
    """
    num_items = scores.shape[1]
    if m >= num_items:
        return eligible.clone()
    # A random permutation before a stable sort breaks ties uniformly, as the research code's shuffle did.
    perm = torch.rand(scores.shape, generator=generator, device=scores.device).argsort(dim=1)  # [B, N]
    shuffled = scores.float().masked_fill(~eligible, float("-inf")).gather(1, perm)
    order = shuffled.argsort(dim=1, descending=True, stable=True)[:, :m]  # [B, m]
    kept = torch.zeros_like(eligible)
    kept.scatter_(1, perm.gather(1, order), True)
    return kept & eligible


def joint_recall(
    scores: list[torch.Tensor],
    target: torch.Tensor,
    mask: torch.Tensor,
    quotas: list[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Recall of the ground truth after every stage of the cascade has kept its quota.

    Stage i keeps its top quotas[i] of what stage i-1 kept, by its own scores.

    Args:
        scores: one [B, N] score tensor per stage, in cascade order.
        target: [B, N] bool, the ground-truth items.
        mask: [B, N] bool, real (not padded) items.
        quotas: items kept by each stage, e.g. [30, 20].
        generator: source of the random tie-break.

    Returns:
        [B] per-request recall |kept ∩ target| / |target| (0 where a request has no target item).
    """
    if len(scores) != len(quotas):
        raise ValueError(f"{len(scores)} score tensors but {len(quotas)} quotas")
    kept = mask
    for stage_scores, quota in zip(scores, quotas):
        kept = top_m_mask(stage_scores, kept, quota, generator)
    target = target & mask
    hits = (kept & target).sum(dim=1).float()
    return hits / target.sum(dim=1).clamp(min=1).float()


def stage_recall(
    scores: torch.Tensor, relevance: torch.Tensor, mask: torch.Tensor, m: int, k: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Recall@k@m of one model on all candidates: |top-m by score ∩ top-k by label| / |top-k by label|.

    Returns:
        [B] per-request recall.
    """
    relevant = top_m_mask(relevance.float(), mask, k, generator)
    kept = top_m_mask(scores, mask, m, generator)
    return (kept & relevant).sum(1).float() / relevant.sum(1).clamp(min=1).float()
