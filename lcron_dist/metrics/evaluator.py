"""Cascade metrics accumulated over a test day and reduced across ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lcron_dist.data import schema
from lcron_dist.metrics.ndcg import ndcg_at_k
from lcron_dist.metrics.recall import joint_recall, stage_recall


class CascadeMetrics:
    """Sums per-request joint recall, per-stage Recall@10@m and NDCG@10 on the device.

    Sums (not means) are kept, so batches of any size and ranks with different numbers of requests
    combine exactly: compute() all-reduces the sums and the request count, then divides once.

    Args:
        stages: stage names in cascade order.
        device: where the sums live (the training device).
        seed: seed of the random tie-break, so a run's metrics are reproducible.
    """

    def __init__(self, stages: tuple[str, ...], device: torch.device, seed: int = 0) -> None:
        self.stages = stages
        self.quotas = list(schema.SERVING_QUOTAS[len(stages)])
        self.names = ["joint_recall"] + [f"{s}/{m}" for s in stages for m in ("recall", "ndcg@10")]
        self.sums = torch.zeros(len(self.names) + 1, dtype=torch.float64, device=device)  # last: count
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @torch.no_grad()
    def update(self, scores: list[torch.Tensor], relevance: torch.Tensor, mask: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch: `scores` per stage [B, N], graded `relevance`, real-item `mask`, ground-truth `target`."""
        g = self.generator
        values = [joint_recall(scores, target, mask, self.quotas, g)]
        for stage_scores, m in zip(scores, self.quotas):
            values.append(stage_recall(stage_scores, relevance, mask, m, schema.TOP_K, g))
            values.append(ndcg_at_k(stage_scores, relevance, mask, schema.TOP_K, g))
        per_request = torch.stack(values, dim=1).double()  # [B, M]
        self.sums[:-1] += per_request.sum(0)
        self.sums[-1] += per_request.shape[0]

    def compute(self, group: dist.ProcessGroup | None = None) -> dict[str, float]:
        """Means over every request seen by every rank (an all-reduce when distributed)."""
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        count = sums[-1].item()
        means = (sums[:-1] / max(count, 1.0)).tolist()
        result = dict(zip(self.names, means))
        result["requests"] = int(count)
        return result


def metrics_summary(metrics: dict[str, float], stages: tuple[str, ...] | list[str]) -> dict:
    """CascadeMetrics.compute() in the shape results.json reports it: joint_recall, and recall and
    NDCG@10 per stage (lcron-train's results and lcron-score's report)."""
    return {"joint_recall": metrics["joint_recall"],
            "stages": {s: {"recall": metrics[f"{s}/recall"], "ndcg@10": metrics[f"{s}/ndcg@10"]} for s in stages}}
