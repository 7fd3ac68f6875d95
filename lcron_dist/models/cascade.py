"""The cascade as one network: per-stage embeddings (TorchRec) + per-stage towers and the loss (dense).

`Cascade.sparse` holds the EmbeddingBagCollections that TorchRec shards; `Cascade.dense` holds every
dense parameter (towers, attention, the loss's learned weights), which DeepSpeed owns. forward(batch)
returns (loss output, scores) so one call drives a training step.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.profiler import record_function

from lcron_dist.config.job_config import ModelConfig
from lcron_dist.data import schema
from lcron_dist.data.batch import Batch
from lcron_dist.models.din import DIN
from lcron_dist.models.dssm import DSSM
from lcron_dist.models.embeddings import StageEmbeddings, StageInputs
from lcron_dist.models.mlp import PrerankMLP


def build_tower(stage: str, config: ModelConfig) -> nn.Module:
    d = config.emb_dim
    user, item, history = len(schema.USER_FEATURES) * d, len(schema.ITEM_FEATURES) * d, len(schema.HISTORY_FEATURES) * d
    if stage == "retrieval":
        return DSSM(user, history, item, config.dssm_hidden)
    if stage == "prerank":
        return PrerankMLP(user, history, item, config.mlp_hidden)
    return DIN(user, history, item, config.din_attention_hidden, config.din_hidden, compile=config.compile)


class CascadeDense(nn.Module):
    """Towers of every stage and the loss, i.e. all dense parameters."""

    def __init__(self, config: ModelConfig, loss: nn.Module) -> None:
        super().__init__()
        self.stages = schema.STAGE_NAMES[config.num_stages]
        self.towers = nn.ModuleDict({stage: build_tower(stage, config) for stage in self.stages})
        self.loss = loss

    def forward(self, inputs: dict[str, StageInputs], label: torch.Tensor, mask: torch.Tensor, compute_loss: bool = True):
        with record_function("lcron/towers"):
            scores = [self.towers[stage](inputs[stage]) for stage in self.stages]  # each [B, N]
        with record_function("lcron/loss"):
            out = self.loss(scores=scores, relevance=label, mask=mask) if compute_loss else None
        return out, scores


class Cascade(nn.Module):
    """Retrieval → (pre-ranking →) ranking, trained as one network.

    Args:
        config: model sizes and stage setting.
        vocab_sizes: embedding rows per feature kind (dataset meta.json).
        loss: the cascade loss module (its parameters are dense parameters).
        device: where tables are allocated; "meta" lets TorchRec materialise only each rank's shards.
    """

    def __init__(self, config: ModelConfig, vocab_sizes: dict[str, int], loss: nn.Module, device: str = "meta") -> None:
        super().__init__()
        self.stages = schema.STAGE_NAMES[config.num_stages]
        self.sparse = nn.ModuleDict({s: StageEmbeddings(s, vocab_sizes, config.emb_dim, device) for s in self.stages})
        self.dense = CascadeDense(config, loss)

    def signature(self) -> dict:
        """What a checkpoint of this model records and must match to load: stages, table and dense shapes."""
        return {
            "num_stages": len(self.stages),
            "tables": {t.name: [t.num_embeddings, t.embedding_dim] for m in self.sparse.values()
                       for collection in m.collections() for t in collection.embedding_bag_configs()},
            "dense": {name: list(p.shape) for name, p in self.dense.named_parameters()},
        }

    def forward(self, batch: Batch, compute_loss: bool = True):
        with record_function("lcron/embedding"):  # input distribution and lookup of every stage's tables
            inputs = {stage: self.sparse[stage](batch) for stage in self.stages}
        return self.dense(inputs, batch.label, batch.mask, compute_loss)
