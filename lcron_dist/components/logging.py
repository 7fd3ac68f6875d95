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
    """One JSON object per log step to RUN_DIR/metrics.jsonl, and optionally TensorBoard scalars.

    Only the main rank writes (rows already carry cross-rank means where they need them).

    Args:
        keep_until: a resumed run's checkpoint step: rows up to it are kept and later ones (written
            after that checkpoint by the stopped attempt, to be trained again) dropped; None starts empty.
    """

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool = False, keep_until: int | None = None) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.board = None
        if enabled:
            kept = []
            if keep_until is not None and self.path.exists():
                for line in self.path.read_text().splitlines():
                    try:
                        if json.loads(line)["step"] <= keep_until:
                            kept.append(line + "\n")
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a line cut short when the stopped attempt died
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.board = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.board is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.board.add_scalar(key, value, row["step"])
            self.board.flush()
