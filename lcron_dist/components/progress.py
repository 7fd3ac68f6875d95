"""What a run has trained so far: the global step and a global data cursor.

The cursor names a day and how many of its *global* batches (batch_size × world_size requests each)
the optimizer has stepped on. Global batches are planned from (seed, day) alone (reader.plan_batches),
so a run at another world size with the same global batch continues from the same cursor; nothing
per-rank or per-iterator needs saving. Nothing else in a step is random (no dropout, no sampling in
the losses; evaluation tie-breaks use a fixed seed), so the cursor and the step are the run's whole
position.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from lcron_dist.data import schema


@dataclass
class TrainProgress:
    step: int = 0
    """Global optimizer steps taken (all days)."""
    day: str = ""
    """The day the cursor is in (YYYY-MM-DD); empty before the first step."""
    batches: int = 0
    """Global batches of `day` trained."""
    day_done: bool = False
    """Every batch of `day` trained (the run moves on to the next day)."""
    requests: int = 0
    """Requests trained, all ranks together."""
    seconds: float = 0.0
    """Seconds spent in the training loop (rank 0's clock), across restarts."""
    stream_rows: list[dict[str, Any]] = field(default_factory=list)
    """lcron-stream's rows of the test days evaluated so far."""

    def start_batch(self, day: dt.date) -> int | None:
        """Global batches of `day` already trained, or None when the day lies behind the cursor."""
        if not self.day:
            return 0
        current = schema.parse_day(self.day)
        if day < current or (day == current and self.day_done):
            return None
        return self.batches if day == current else 0

    def advance(self, day: dt.date, requests: int, last: bool) -> None:
        """One global batch of `day` with `requests` requests was trained (`last`: the day's final one)."""
        name = str(day)
        if name != self.day:
            self.day, self.batches = name, 0
        self.step += 1
        self.batches += 1
        self.requests += requests
        self.day_done = last

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainProgress:
        return cls(**values)
