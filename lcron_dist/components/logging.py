"""One logger with the rank in its prefix, and the run folder's metrics.jsonl sink (rank 0 only)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any


def build_logger(rank: int, name: str = "lcron_dist") -> logging.Logger:
    """A stderr logger whose lines start with '[rank R]'."""
    logger = logging.getLogger(name)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[rank {rank}] %(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


class MetricsSink:
    """Appends one JSON object per log step to RUN_DIR/metrics.jsonl (only the main rank writes)."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        if enabled:
            self.path.write_text("")

    def write(self, row: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
