"""lcron_dist: distributed trainer for cascade ranking with the LCRON loss."""

__version__ = "0.1.0"
