"""DSSM two-tower retrieval model: score = <user tower, item tower>."""

from __future__ import annotations

import torch
from torch import nn

from lcron_dist.models.embeddings import StageInputs
from lcron_dist.models.layers import build_mlp


class DSSM(nn.Module):
    """User tower on user fields + mean-pooled history; item tower on candidate fields.

    Args:
        user_dim, history_dim, item_dim: widths of the embedded inputs.
        hidden: tower sizes; the last is the dot-product dimension.
    """

    def __init__(self, user_dim: int, history_dim: int, item_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.user_tower = build_mlp(user_dim + history_dim, hidden)
        self.item_tower = build_mlp(item_dim, hidden)

    def forward(self, x: StageInputs) -> torch.Tensor:
        user = self.user_tower(torch.cat([x.user, x.pooled_history()], dim=-1))  # [B, H]
        items = self.item_tower(x.item)  # [B, N, H]
        return torch.einsum("bh,bnh->bn", user, items)
