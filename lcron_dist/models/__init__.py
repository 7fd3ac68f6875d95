"""Cascade models: DSSM (retrieval), MLP (pre-ranking), DIN (ranking), and the cascade that holds them."""

from lcron_dist.models.cascade import STAGES, Cascade

__all__ = ["STAGES", "Cascade"]
