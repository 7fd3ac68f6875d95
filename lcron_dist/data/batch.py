"""A batch of requests as tensors, and its id features as TorchRec KeyedJaggedTensors."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lcron_dist.data import schema


@dataclass
class Batch:
    """B requests with N candidates each and a history of L positions.

    Id features are feature-major, so each KeyedJaggedTensor's values are a view of these tensors.
    Id 0 is padding everywhere (padded candidates, empty history positions).
    """

    request_id: torch.Tensor
    """[B] int64."""
    user: torch.Tensor
    """[U, B] int64, schema.USER_FEATURES."""
    item: torch.Tensor
    """[F, B, N] int64, schema.ITEM_FEATURES; candidates in group order, ground-truth group first."""
    history: torch.Tensor
    """[H, B, L] int64, schema.HISTORY_FEATURES; left-padded like the raw history."""
    hist_len: torch.Tensor
    """[B] int64, valid history positions."""
    label: torch.Tensor
    """[B, N] int64 graded relevance (METHOD.md section 1); 0 on padded candidates."""
    mask: torch.Tensor
    """[B, N] bool, real (not padded) candidates."""
    target: torch.Tensor
    """[B, N] bool, ground-truth candidates (the first group, where real)."""

    @property
    def size(self) -> int:
        return self.request_id.shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @property
    def num_slots(self) -> int:
        """Embedding slots per request: max(N, L), so candidates and history share one layout."""
        return max(self.item.shape[-1], self.history.shape[-1])

    def id_features(self) -> KeyedJaggedTensor:
        """Every id feature in one KeyedJaggedTensor of stride B·M (M = num_slots).

        Each request owns M consecutive bags per feature, each holding one id or none: user features
        fill slot 0, candidate features (cand_*) slots 0..N-1, history features (hist_*) slots 0..L-1.
        An EmbeddingBagCollection then returns, per feature, a [B·M, D] tensor that is a [B, M, D]
        view, and candidate and history features of the same kind can share one table (one module,
        one stride), whichever sharding TorchRec applies. Keys come in schema.ID_FEATURE_KEYS order.
        """
        b, m = self.size, self.num_slots
        slot = torch.arange(m, device=self.item.device)
        values, lengths = {}, {}
        for names, prefix, ids in ((schema.USER_FEATURES, "", self.user.unsqueeze(-1)),
                                   (schema.ITEM_FEATURES, "cand_", self.item),
                                   (schema.HISTORY_FEATURES, "hist_", self.history)):  # ids: [K, B, used slots]
            # [B, M]: 1 where the slot holds an id; bags are consecutive per feature, then request.
            present = (slot < ids.shape[-1]).to(torch.int32).expand(b, m).reshape(-1)
            for name, column in zip(names, ids):
                values[prefix + name], lengths[prefix + name] = column.reshape(-1), present
        keys = list(schema.ID_FEATURE_KEYS)
        return KeyedJaggedTensor(keys=keys, values=torch.cat([values[k] for k in keys]),
                                 lengths=torch.cat([lengths[k] for k in keys]))
