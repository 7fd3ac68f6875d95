"""Cascade metrics computed per request, batched on the training device (METHOD.md section 7)."""

from lcron_dist.metrics.recall import joint_recall, top_m_mask

__all__ = ["joint_recall", "top_m_mask"]
