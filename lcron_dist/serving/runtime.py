"""An exported cascade as a server runs it, from the export folder alone: torch, fbgemm_gpu and pyarrow.

Nothing here imports TorchRec or the rest of lcron_dist: the programs hold aten and fbgemm ops (fbgemm_gpu
registers the latter on import), the item index is a Parquet file. Inputs are batch-major int64 ids in
the manifest's feature order (`inputs`): user [B, U], item [B, N, F], history [B, L, H], plus the
candidates' real-item mask [B, N] for selection.
"""

from __future__ import annotations

import json
from pathlib import Path

import fbgemm_gpu  # noqa: F401  (registers the fbgemm ops the programs call)
import numpy as np
import pyarrow.parquet as pq
import torch

MANIFEST = "manifest.json"


class ExportError(ValueError):
    """An export folder that cannot be served (the message names the file)."""


def read_export_manifest(root: Path) -> dict:
    """The manifest of export folder `root`, after checking that every file it lists is there and whole.

    (The same commit check as a checkpoint's, components.checkpoint.read_manifest, whose messages speak
    of checkpoints and which a server need not import.)
    """
    path = Path(root) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
        sizes = {Path(root) / name: size for name, size in manifest["files"].items()}
    except FileNotFoundError:
        raise ExportError(f"{path} is missing: {root} is not a complete export (run lcron-export)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExportError(f"{path} is damaged ({exc})") from None
    bad = [f"{file} ({size:,} bytes listed)" for file, size in sizes.items()
           if not file.is_file() or file.stat().st_size != size]
    if bad:
        raise ExportError(f"{bad[0]} is missing or altered: {root} is not a complete export (listed in {path})")
    return manifest


class ExportedCascade:
    """The programs and the item index of an export, and the cascade they make.

    Args:
        root: the export folder (lcron-export --out).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.manifest = read_export_manifest(self.root)
        self.stages: list[str] = self.manifest["stages"]
        self.quotas: list[int] = self.manifest["quotas"]
        self.programs = {name: torch.export.load(self.root / file).module()
                         for name, file in self.manifest["programs"].items()}
        self.video_column = self.manifest["inputs"]["item"].index("video_id")
        table = pq.read_table(self.root / self.manifest["item_embeddings"], columns=["video_id", "embedding"])
        ids = torch.from_numpy(table.column("video_id").to_numpy().astype(np.int64))  # a writable copy
        vectors = table.column("embedding").combine_chunks()
        dim = vectors.type.list_size
        size = int(ids.max()) + 1 if len(ids) else 1
        # A dense id -> row lookup: video ids are table rows (< the video_id vocabulary) by construction.
        self.item_vectors = torch.zeros(size, dim)
        self.item_vectors[ids] = torch.from_numpy(vectors.flatten().to_numpy().reshape(len(ids), dim).copy())
        self.indexed = torch.zeros(size, dtype=torch.bool)
        self.indexed[ids] = True

    # ---- one stage ----------------------------------------------------------------------------

    def is_indexed(self, video: torch.Tensor) -> torch.Tensor:
        """Whether each video id of `video` (any shape) has a vector in the item index."""
        return self.indexed[video.clamp(max=len(self.indexed) - 1)] & (video < len(self.indexed))

    def retrieval_scores(self, user: torch.Tensor, item: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """[B, N] dot products of the user vector with the candidates' indexed vectors; -inf if not indexed."""
        users = self.programs["retrieval_user"](user, history)  # [B, H]
        video = item[..., self.video_column]
        vectors = self.item_vectors[video.clamp(max=len(self.indexed) - 1)]  # [B, N, H]
        scores = torch.einsum("bh,bnh->bn", users, vectors)
        return scores.masked_fill(~self.is_indexed(video), float("-inf"))

    def stage_scores(self, stage: str, user: torch.Tensor, item: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
        """[B, N] scores of `stage` for every candidate of `item` [B, N, F]."""
        if stage == "retrieval":
            return self.retrieval_scores(user, item, history)
        return self.programs[stage](user, item, history)

    # ---- the cascade --------------------------------------------------------------------------

    @torch.no_grad()
    def score_all(self, user: torch.Tensor, item: torch.Tensor, history: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's [B, N] scores of every candidate (what per-stage metrics need)."""
        return [self.stage_scores(stage, user, item, history) for stage in self.stages]

    @torch.no_grad()
    def serve(self, user: torch.Tensor, item: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The funnel: each stage scores what the previous one kept and keeps its quota.

        Returns:
            [B, q_T] candidate positions (into `item`'s N) the last stage keeps, best first; where a
            request has fewer real candidates than a quota, padded ones fill the tail (mask them).
        """
        kept = torch.arange(item.shape[1]).expand(item.shape[0], -1)  # [B, N]
        for stage, quota in zip(self.stages, self.quotas):
            ids = item.gather(1, kept.unsqueeze(-1).expand(-1, -1, item.shape[-1]))  # [B, n, F]
            scores = self.stage_scores(stage, user, ids, history).masked_fill(~mask.gather(1, kept), float("-inf"))
            kept = kept.gather(1, scores.topk(min(quota, kept.shape[1]), dim=1).indices)
        return kept
