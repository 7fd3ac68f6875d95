"""The modules a serving export traces: a stage's unsharded tables and tower behind plain id tensors.

Serving inputs are batch-major int64 ids, one row per request, columns in the manifest's feature order:
user [B, U] (schema.USER_FEATURES), item [B, N, F] (schema.ITEM_FEATURES), history [B, L, H]
(schema.HISTORY_FEATURES, left-padded with 0). Inside, they become the training Batch's id layout and go
through the same StageEmbeddings and towers as in training, so an fp32 program computes the trainer's
scores; with --dtype int8 TorchRec's inference quantization swaps each EmbeddingBagCollection for its
int8 counterpart (fbgemm's IntNBit table-batched lookup) first. The programs contain aten and fbgemm
ops only: they load with torch and fbgemm_gpu, without TorchRec or lcron_dist.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim, ExportedProgram

from lcron_dist.data import schema
from lcron_dist.data.batch import Batch
from lcron_dist.models import Cascade
from lcron_dist.models.dssm import DSSM
from lcron_dist.models.embeddings import StageEmbeddings, StageInputs

EXAMPLE_BATCH, EXAMPLE_CANDIDATES = 3, 7
"""Sizes of the tracing example: neither 0, 1 nor any fixed width, so export keeps B and N symbolic."""


def id_batch(user: torch.Tensor, item: torch.Tensor, history: torch.Tensor) -> Batch:
    """Batch-major serving ids [B, U], [B, N, F], [B, L, H] as a Batch's feature-major id fields.

    Only the id fields (and request_id, which sizes the batch) are set: StageEmbeddings reads nothing else.
    """
    return Batch(request_id=user[:, 0], user=user.T, item=item.permute(2, 0, 1), history=history.permute(2, 0, 1),
                 hist_len=None, label=None, mask=None, target=None)


def embed(embeddings: StageEmbeddings, user: torch.Tensor, item: torch.Tensor, history: torch.Tensor) -> StageInputs:
    """One stage's embedded inputs of serving ids, as in training."""
    batch = id_batch(user, item, history)
    return embeddings(batch)


class UserTower(nn.Module):
    """Retrieval's user side: user and history ids -> the user vector [B, H] of DSSM's dot product."""

    def __init__(self, embeddings: StageEmbeddings, dssm: DSSM) -> None:
        super().__init__()
        self.embeddings, self.dssm = embeddings, dssm

    def forward(self, user: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        # One padding candidate keeps the training layout; its lookups are discarded.
        item = user.new_zeros((user.shape[0], 1, len(schema.ITEM_FEATURES)))
        x = embed(self.embeddings, user, item, history)
        return self.dssm.user_tower(torch.cat([x.user, x.pooled_history()], dim=-1))


class ItemTower(nn.Module):
    """Retrieval's item side: candidate ids [B, N, F] -> item vectors [B, N, H] (the catalogue's index)."""

    def __init__(self, embeddings: StageEmbeddings, dssm: DSSM) -> None:
        super().__init__()
        self.embeddings, self.dssm = embeddings, dssm

    def forward(self, item: torch.Tensor) -> torch.Tensor:
        b = item.shape[0]
        user = item.new_zeros((b, len(schema.USER_FEATURES)))
        history = item.new_zeros((b, 1, len(schema.HISTORY_FEATURES)))
        return self.dssm.item_tower(embed(self.embeddings, user, item, history).item)


class StageScorer(nn.Module):
    """A ranking-side stage (pre-ranking MLP, ranking DIN): requests with candidates -> scores [B, N]."""

    def __init__(self, embeddings: StageEmbeddings, tower: nn.Module) -> None:
        super().__init__()
        self.embeddings, self.tower = embeddings, tower

    def forward(self, user: torch.Tensor, item: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        return self.tower(embed(self.embeddings, user, item, history))


def build_serving_modules(model: Cascade) -> dict[str, nn.Module]:
    """The exported modules of a cascade, by program name, sharing the cascade's weights.

    retrieval_user (UserTower), then one StageScorer per later stage (prerank, ranking); the item tower
    is not a program: its vectors are precomputed into the catalogue.
    """
    modules: dict[str, nn.Module] = {"retrieval_user": UserTower(model.sparse["retrieval"], model.dense.towers["retrieval"])}
    for stage in model.stages[1:]:
        modules[stage] = StageScorer(model.sparse[stage], model.dense.towers[stage])
    return modules


def quantize_tables(module: nn.Module) -> nn.Module:
    """Swap every EmbeddingBagCollection in `module` for TorchRec's int8 inference collection (in place).

    Each collection's lookups become fbgemm IntNBit table-batched embedding modules (TBEs: int8 rows with
    an fp16 scale and bias, padded to 16-byte alignment), which hold fbgemm script objects (their cache's
    counters and location queue); TorchRec's fake classes of those let torch.export trace them. The
    collection's per-table `weight` buffers, views of the TBEs' weights kept for its state dict, are
    dropped: the lookup never reads them, and an exported program would store the rows a second time.
    """
    from torchrec.inference.modules import quantize_inference_model
    from torchrec.pt2.utils import register_fake_classes
    from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection

    global _fake_classes_registered
    if not _fake_classes_registered:
        register_fake_classes()
        _fake_classes_registered = True
    quantize_inference_model(module, quantization_dtype=torch.int8, output_dtype=torch.float32)
    for collection in module.modules():
        if isinstance(collection, QuantEmbeddingBagCollection):
            collection.embedding_bags = nn.ModuleDict()
    return module


_fake_classes_registered = False


def example_inputs(name: str, seq_len: int) -> tuple[torch.Tensor, ...]:
    """Padding ids of the tracing example for program `name`."""
    b, n = EXAMPLE_BATCH, EXAMPLE_CANDIDATES
    user = torch.zeros(b, len(schema.USER_FEATURES), dtype=torch.int64)
    history = torch.zeros(b, seq_len, len(schema.HISTORY_FEATURES), dtype=torch.int64)
    if name == "retrieval_user":
        return user, history
    return user, torch.zeros(b, n, len(schema.ITEM_FEATURES), dtype=torch.int64), history


@torch.no_grad()
def export_program(name: str, module: nn.Module, seq_len: int, max_batch: int = 1 << 15,
                   max_candidates: int = 1 << 12) -> ExportedProgram:
    """torch.export `module` with a symbolic batch size (and candidate count)."""
    args = example_inputs(name, seq_len)
    module(*args)  # TorchRec's inference collections cache their feature order on the first call
    batch = Dim("batch", min=1, max=max_batch)
    if name == "retrieval_user":
        shapes = ({0: batch}, {0: batch})
    else:
        candidates = Dim("candidates", min=1, max=max_candidates)
        shapes = ({0: batch}, {0: batch, 1: candidates}, {0: batch})
    return torch.export.export(module, args, dynamic_shapes=shapes, strict=False)
