"""Pre-ranking MLP (3-stage cascade): one network on [user ‖ pooled history ‖ item]."""

from __future__ import annotations

import torch
from torch import nn

from lcron_dist.models.embeddings import StageInputs
from lcron_dist.models.layers import build_mlp


class PrerankMLP(nn.Module):
    def __init__(self, user_dim: int, history_dim: int, item_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.net = build_mlp(user_dim + history_dim + item_dim, hidden, out_dim=1)

    def forward(self, x: StageInputs) -> torch.Tensor:
        n = x.item.shape[1]
        context = torch.cat([x.user, x.pooled_history()], dim=-1).unsqueeze(1).expand(-1, n, -1)  # [B, N, C]
        return self.net(torch.cat([context, x.item], dim=-1)).squeeze(-1)  # [B, N]
