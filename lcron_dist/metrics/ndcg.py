"""NDCG@k with linear gain (the graded relevance label) and log2 discount."""

from __future__ import annotations

import torch


def _dcg(order_keys: torch.Tensor, relevance: torch.Tensor, mask: torch.Tensor, k: int,
         generator: torch.Generator | None) -> torch.Tensor:
    # Random permutation + stable sort = uniformly random tie-break, as in top_m_mask.
    perm = torch.rand(order_keys.shape, generator=generator, device=order_keys.device).argsort(dim=1)
    keys = order_keys.float().masked_fill(~mask, float("-inf")).gather(1, perm)
    top = perm.gather(1, keys.argsort(dim=1, descending=True, stable=True)[:, :k])  # [B, k]
    gains = (relevance.float() * mask).gather(1, top)
    discount = torch.log2(torch.arange(2, top.shape[1] + 2, device=gains.device, dtype=torch.float32))
    return (gains / discount).sum(1)


def ndcg_at_k(scores: torch.Tensor, relevance: torch.Tensor, mask: torch.Tensor, k: int = 10,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """[B] NDCG@k of `scores` [B, N] against graded `relevance` [B, N]; padded items never ranked."""
    ideal = _dcg(relevance, relevance, mask, k, generator)
    return _dcg(scores, relevance, mask, k, generator) / ideal.clamp(min=1e-12)
