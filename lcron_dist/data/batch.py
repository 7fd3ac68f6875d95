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

    def user_kjt(self) -> KeyedJaggedTensor:
        """Per-request features: stride B, one id per feature and request."""
        return _fixed_length_kjt(schema.USER_FEATURES, self.user, 1)

    def item_kjt(self) -> KeyedJaggedTensor:
        """Per-candidate features: stride B·N (candidate-major within a request), one id each."""
        return _fixed_length_kjt(schema.ITEM_FEATURES, self.item, 1)

    def history_kjt(self) -> KeyedJaggedTensor:
        """History features: stride B, L ids per request (padding id 0 kept, so [B, L] is a reshape)."""
        return _fixed_length_kjt(schema.HISTORY_FEATURES, self.history, self.history.shape[-1])


def _fixed_length_kjt(keys: tuple[str, ...], ids: torch.Tensor, length: int) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor over feature-major `ids` [F, ...] where every bag has `length` ids."""
    values = ids.reshape(-1)
    lengths = torch.full((values.numel() // length,), length, dtype=torch.int32, device=ids.device)
    return KeyedJaggedTensor(keys=list(keys), values=values, lengths=lengths)
