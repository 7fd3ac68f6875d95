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
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

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
    """The tables of one stage, named '<stage>__<kind>' (schema.TABLE_FEATURES)."""
    return [EmbeddingBagConfig(name=f"{stage}__{kind}", embedding_dim=dim, num_embeddings=vocab_sizes[kind],
                               feature_names=list(features), pooling=PoolingType.SUM)
            for kind, features in schema.TABLE_FEATURES.items()]


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
        self._column_cache: dict[tuple, list[torch.Tensor]] = {}

    def forward(self, features: KeyedJaggedTensor, batch: Batch) -> StageInputs:
        """Embed `features` (batch.id_features(), shared by every stage) for this stage."""
        pooled = self.ebc(features)  # KeyedTensor: [B·M, Σ D] values, one column block per feature
        user, item, history = SlotSplit.apply(pooled.values(), batch.num_slots, batch.item.shape[-1],
                                              batch.history.shape[-1], *self._columns(pooled), self.dim)
        return StageInputs(user=user, item=item, history=history, history_mask=batch.history[0] > 0)

    def _columns(self, pooled: KeyedTensor) -> list[torch.Tensor]:
        """Each SLOT_GROUPS block's feature positions in the pooled values (cached per key order and device)."""
        key = (tuple(pooled.keys()), pooled.values().device)
        if key not in self._column_cache:
            position = {name: i for i, name in enumerate(pooled.keys())}
            self._column_cache[key] = [torch.tensor([position[name] for name in names], device=key[1])
                                       for names in SLOT_GROUPS]
        return self._column_cache[key]


SLOT_GROUPS: tuple[tuple[str, ...], ...] = (
    schema.USER_FEATURES,
    tuple(f"cand_{name}" for name in schema.ITEM_FEATURES),
    tuple(f"hist_{name}" for name in schema.HISTORY_FEATURES),
)
"""The features of StageInputs' user, item and history blocks, in their column order."""


class SlotSplit(torch.autograd.Function):
    """The pooled [B·M, K·D] embeddings (K features of D columns each) → user [B, U·D] (slot 0), item
    [B, N, F·D] (slots < N) and history [B, L, H·D] (slots < L): the used slots of each group's features.

    Features are selected as whole D-wide blocks of a [B, M, K, D] view. The backward writes the three
    gradients into one zero [B, M, K, D] buffer (empty bags keep zeros), where slicing and concatenating
    per feature would allocate and fill a full-size gradient for each of the 21 features, then
    concatenate them again.
    """

    @staticmethod
    def forward(ctx, pooled: torch.Tensor, slots: int, n: int, length: int, user_features: torch.Tensor,
                item_features: torch.Tensor, history_features: torch.Tensor, dim: int):
        grid = pooled.view(-1, slots, pooled.shape[-1] // dim, dim)  # [B, M, K, D]
        ctx.shape, ctx.used = grid.shape, (1, n, length)
        ctx.save_for_backward(user_features, item_features, history_features)
        b = grid.shape[0]
        # Advanced indexing copies the D-wide blocks about twice as fast as index_select here.
        return (grid[:, 0][:, user_features].view(b, -1), grid[:, :n][:, :, item_features].view(b, n, -1),
                grid[:, :length][:, :, history_features].view(b, length, -1))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        grid = next(g for g in grads if g is not None).new_zeros(ctx.shape)
        b, _, _, dim = ctx.shape
        for grad, used, features in zip(grads, ctx.used, ctx.saved_tensors):
            if grad is not None:
                grid[:, :used].index_copy_(2, features, grad.reshape(b, used, len(features), dim))
        return grid.view(b * ctx.shape[1], -1), None, None, None, None, None, None, None
