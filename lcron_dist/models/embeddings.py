"""A stage's id embeddings: one TorchRec EmbeddingBagCollection over the batch's slot layout.

Each stage owns its tables (no sharing across stages). Within a stage, a candidate feature and the
history feature of the same kind (video_id, author_id, categories, upload_type) share one table.
See Batch.id_features for the slot layout that makes one collection serve all three feature groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lcron_dist.data import schema
from lcron_dist.data.batch import Batch


@dataclass
class StageInputs:
    """Embedded features of a batch for one stage's tower."""

    user: torch.Tensor
    """[B, U·D] user and request-time features."""
    item: torch.Tensor
    """[B, N, F·D] candidate features."""
    history: torch.Tensor
    """[B, L, H·D] history features."""
    history_mask: torch.Tensor
    """[B, L] bool, valid history positions."""

    def pooled_history(self) -> torch.Tensor:
        """[B, H·D] mean of the valid history positions (zeros for an empty history)."""
        mask = self.history_mask.unsqueeze(-1).to(self.history.dtype)
        return (self.history * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def table_configs(stage: str, vocab_sizes: dict[str, int], dim: int) -> list[EmbeddingBagConfig]:
    """The tables of one stage, named '<stage>__<kind>'."""
    shared = set(schema.HISTORY_FEATURES)
    kinds = list(dict.fromkeys([*schema.USER_FEATURES, *schema.ITEM_FEATURES]))
    configs = []
    for kind in kinds:
        if kind in schema.USER_FEATURES:
            features = [kind]
        elif kind in shared:
            features = [f"cand_{kind}", f"hist_{kind}"]
        else:
            features = [f"cand_{kind}"]
        configs.append(EmbeddingBagConfig(
            name=f"{stage}__{kind}", embedding_dim=dim, num_embeddings=vocab_sizes[kind],
            feature_names=features, pooling=PoolingType.SUM,
        ))
    return configs


class StageEmbeddings(nn.Module):
    """Looks up one stage's features and reshapes them for its tower.

    Args:
        stage: stage name (prefix of its table names).
        vocab_sizes: rows per feature kind (dataset meta.json).
        dim: embedding dimension.
        device: where to allocate tables; "meta" defers allocation to TorchRec's sharding.
    """

    def __init__(self, stage: str, vocab_sizes: dict[str, int], dim: int, device: torch.device | str = "meta") -> None:
        super().__init__()
        self.dim = dim
        self.ebc = EmbeddingBagCollection(tables=table_configs(stage, vocab_sizes, dim), device=torch.device(device))

    def forward(self, features: KeyedJaggedTensor, batch: Batch) -> StageInputs:
        """Embed `features` (batch.id_features(), shared by every stage) for this stage."""
        pooled = self.ebc(features).to_dict()  # feature -> [B·M, D]
        slots = batch.num_slots

        def group(names: list[str], used: int) -> torch.Tensor:  # -> [B, used, len(names)·D]
            return torch.cat([pooled[name].view(-1, slots, self.dim)[:, :used] for name in names], dim=-1)

        return StageInputs(
            user=group(list(schema.USER_FEATURES), 1).squeeze(1),
            item=group([f"cand_{k}" for k in schema.ITEM_FEATURES], batch.item.shape[-1]),
            history=group([f"hist_{k}" for k in schema.HISTORY_FEATURES], batch.history.shape[-1]),
            history_mask=batch.history[0] > 0,
        )
