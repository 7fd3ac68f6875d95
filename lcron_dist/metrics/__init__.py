"""Cascade metrics computed per request, batched on the training device (METHOD.md section 7)."""

from lcron_dist.metrics.evaluator import CascadeMetrics, metrics_summary
from lcron_dist.metrics.ndcg import ndcg_at_k
from lcron_dist.metrics.recall import joint_recall, stage_recall, top_m_mask

__all__ = ["CascadeMetrics", "joint_recall", "metrics_summary", "ndcg_at_k", "stage_recall", "top_m_mask"]
