"""A complete checkpoint -> one unsharded Cascade on the CPU, in one process, without a process group.

Checkpoints hold the tables as TorchRec wrote them from the DMP state dict (`tables.sparse.<stage>.ebc.
embedding_bags.<table>.weight`, `user_ebc` for the user tables: whole tensors for data-parallel tables,
ShardedTensor chunks for table-, row- or column-wise ones, from any world size) and the dense weights
unpartitioned (`dense.<name>`).
DCP's planner reads any saved chunk layout into a whole destination tensor, so loading the weights of an
unsharded model with `no_dist=True` works for every world size and sharding; the optimizer state is not
read at all.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from lcron_dist.components.checkpoint import Checkpointer, CheckpointError, first_mismatch
from lcron_dist.config.job_config import ModelConfig
from lcron_dist.losses import build_loss
from lcron_dist.models import Cascade


def table_vocab_sizes(tables: dict[str, list[int]]) -> dict[str, int]:
    """Rows per feature kind from a signature's {'<stage>__<kind>': [rows, dim]} (equal in every stage)."""
    sizes: dict[str, int] = {}
    for name, (rows, _) in tables.items():
        kind = name.split("__", 1)[1]
        if sizes.setdefault(kind, rows) != rows:
            raise CheckpointError(f"table {name} has {rows} rows, another stage's {kind} table {sizes[kind]}")
    return sizes


@torch.no_grad()
def restore_cascade(path: str | Path) -> tuple[Cascade, Path, dict]:
    """The trained cascade of a checkpoint (unsharded, CPU, eval mode), its folder and its manifest.

    Args:
        path: a checkpoint folder (step-N), or a run's checkpoints/ folder: its newest complete checkpoint.

    Raises:
        CheckpointError: the checkpoint is missing or incomplete (naming the file), or of a model this
            code does not build (naming the first difference).
    """
    found = Checkpointer(Path(path), keep=2, rank=0, log=logging.getLogger(__name__)).resolve(str(path))
    if found is None:
        raise CheckpointError(f"{path} holds no complete checkpoint")
    path, manifest = found
    config = manifest["config"]
    model_config = ModelConfig(**{**config["model"], "compile": False})  # compiling only pays off in training
    loss = build_loss(config["loss"]["name"], num_stages=model_config.num_stages, **config["loss"]["options"])
    model = Cascade(model_config, table_vocab_sizes(manifest["model"]["tables"]), loss, device="cpu")
    mismatch = first_mismatch(manifest["model"], model.signature(), "model")
    if mismatch:
        raise CheckpointError(f"checkpoint {path} does not match the model its config describes: {mismatch}")
    weights = model.state_dict()  # detached views of the parameters: DCP reads into them in place
    state = {"tables": {k: v for k, v in weights.items() if k.startswith("sparse.")},
             "dense": {name: weights[f"dense.{name}"] for name in manifest["model"]["dense"]}}
    try:
        with warnings.catch_warnings():  # "assuming ... a single process": exactly the intent
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except Exception as exc:  # DCP wraps a reader's failure in its own exception types
        raise CheckpointError(f"checkpoint {path}: its tensors could not be read ({exc})") from exc
    return model.eval(), path, manifest
