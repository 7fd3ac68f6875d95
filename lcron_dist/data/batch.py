"""A batch of requests as tensors, and its id features as TorchRec KeyedJaggedTensors."""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from lcron_dist.data import schema


@dataclass
class Batch(Pipelineable):
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

    def record_stream(self, stream: torch.Stream) -> None:
        """Mark the tensors as in use on `stream` (the train pipeline's copy and input-dist CUDA streams)."""
        for f in fields(self):
            getattr(self, f.name).record_stream(stream)

    def pin_memory(self) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @property
    def num_slots(self) -> int:
        """Item embedding slots per request: N candidates, then L history positions."""
        return schema.item_slots(self.item.shape[-1], self.history.shape[-1])

    @functools.cached_property
    def features(self) -> IdFeatures:
        """The id features as two KeyedJaggedTensors, one bag per id, keys in their schema order.

        Built once per batch: TorchRec's train pipeline reads them (an attribute of the batch) to start
        the batch's input distribution a step ahead, and the forward reads them again.

        user: schema.USER_FEATURES, one bag per request (stride B). item: one key per kind of
        schema.ITEM_FEATURES, S = N + L bags per request (stride B·S, S = num_slots): the B·N
        candidates' ids, request by request, then the B·L history positions' (empty bags for a kind
        without history). An EmbeddingBagCollection over `item` returns [B·S, F·D] rows in two blocks:
        the first B·N rows are the candidates' inputs as they are ([B, N, F·D], no copy), the last B·L
        rows' leading H·D columns the history's (the history kinds lead schema.ITEM_FEATURES); a
        kind's candidates and history share one table (one key), whichever sharding TorchRec applies.
        Each key's id count follows from the shapes and is stated (length_per_key), so splitting the
        KJTs by key needs no data-dependent size (in an exported serving program, no `.item()` and its
        runtime checks per feature).
        """
        b, n = self.size, self.item.shape[-1]
        user = KeyedJaggedTensor(keys=list(schema.USER_FEATURES), values=self.user.reshape(-1),
                                 lengths=torch.ones(self.user.numel(), dtype=torch.int32, device=self.user.device),
                                 length_per_key=[b] * len(schema.USER_FEATURES))
        with_history = torch.ones(b * self.num_slots, dtype=torch.int32, device=self.item.device)  # [B·S]
        candidates_only = torch.cat([with_history[: b * n], torch.zeros_like(with_history[b * n:])])
        values, lengths = [], []
        for k, kind in enumerate(schema.ITEM_FEATURES):
            if k < len(schema.HISTORY_FEATURES):
                values.append(torch.cat([self.item[k].reshape(-1), self.history[k].reshape(-1)]))
                lengths.append(with_history)
            else:
                values.append(self.item[k].reshape(-1))
                lengths.append(candidates_only)
        item = KeyedJaggedTensor(keys=list(schema.ITEM_FEATURES), values=torch.cat(values), lengths=torch.cat(lengths),
                                 length_per_key=[v.numel() for v in values])
        return IdFeatures(user, item)


class IdFeatures(NamedTuple):
    """Batch.features: the user and the item KeyedJaggedTensor."""

    user: KeyedJaggedTensor
    item: KeyedJaggedTensor
