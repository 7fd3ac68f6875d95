"""Cascade models: DSSM (retrieval), MLP (pre-ranking), DIN (ranking), and the cascade that holds them."""

from lcron_dist.models.cascade import Cascade

__all__ = ["Cascade"]
