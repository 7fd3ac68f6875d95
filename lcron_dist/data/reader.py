"""The local reader: a converted day -> batches for one rank, with no per-request Python work.

Batches are planned globally: a day (shuffled by seed, or in log order for evaluation) is cut into
global batches of batch_size × world_size requests, and each global batch is split evenly across
ranks. Every rank therefore takes the same number of steps, every request is used exactly once per
pass, and a W-rank run sees, step by step, the same requests as a 1-rank run with a W× larger batch.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lcron_dist.data import dataset, schema
from lcron_dist.data.batch import Batch
from lcron_dist.data.dataset import DatasetMeta
from lcron_dist.data.errors import DataError

DayArrays = dict[str, np.ndarray]
"""A day as numpy arrays: [R] per request, [R, N] per candidate, [R, L] per history position."""


def table_to_arrays(table: pa.Table) -> DayArrays:
    """Map each column of a converted table to a numpy array, sharing the Arrow buffers where possible."""
    arrays: DayArrays = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(column.type):
            arrays[name] = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size)
        else:
            arrays[name] = column.to_numpy(zero_copy_only=False)
    return arrays


def load_day(root: Path, day: dt.date, meta: DatasetMeta) -> DayArrays:
    """Read one converted day into memory, checking its schema."""
    expected = dataset.arrow_schema(meta.num_candidates)
    try:
        table = pq.read_table(dataset.day_files(root, day), schema=expected, partitioning=None)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"unreadable or not of the converted schema: {exc}", file=dataset.day_dir(root, day), day=day) from None
    return table_to_arrays(table)


def global_batch_bounds(num_requests: int, batch_size: int, world_size: int) -> list[tuple[int, int]]:
    """[start, end) of each global batch of a day: batch_size × world_size requests of its order.

    A tail too small to give every rank a request joins the previous global batch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    starts = list(range(0, num_requests, batch_size * world_size))
    if len(starts) > 1 and num_requests - starts[-1] < world_size:
        starts.pop()
    return list(zip(starts, starts[1:] + [num_requests]))


def plan_batches(
    num_requests: int, batch_size: int, rank: int, world_size: int, shuffle: bool, seed: int, day: dt.date
) -> list[np.ndarray]:
    """Row indices of this rank's batches for one day.

    Args:
        num_requests: requests in the day.
        batch_size: requests per rank and step.
        rank, world_size: this rank and the number of ranks.
        shuffle: permute the day by (seed, day); False keeps log order (evaluation).
        seed: shuffle seed, the same on every rank.
        day: the day (mixed into the shuffle so each day has its own order).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world of size {world_size}")
    bounds = global_batch_bounds(num_requests, batch_size, world_size)
    order = (np.random.default_rng([seed, day.toordinal()]).permutation(num_requests)
             if shuffle else np.arange(num_requests))
    return [np.array_split(order[s:e], world_size)[rank] for s, e in bounds]


def make_batch(arrays: DayArrays, rows: np.ndarray | slice, group_size: int = schema.GROUP_SIZE) -> Batch:
    """Gather `rows` (indices or a slice) of a day into a Batch (one copy per field)."""

    def stack(names: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([arrays[name][rows] for name in names]).astype(np.int64))

    mask = torch.from_numpy(arrays["cand_mask"][rows] != 0)
    target = mask.clone()
    target[:, group_size:] = False
    return Batch(
        request_id=torch.from_numpy(arrays["request_id"][rows]),
        user=stack(list(schema.USER_FEATURES)),
        item=stack([f"cand_{name}" for name in schema.ITEM_FEATURES]),
        history=stack([f"hist_{name}" for name in schema.HISTORY_FEATURES]),
        hist_len=torch.from_numpy(arrays["hist_len"][rows].astype(np.int64)),
        label=torch.from_numpy(arrays["cand_label"][rows].astype(np.int64)),
        mask=mask,
        target=target,
    )


class DayReader:
    """One rank's view of a converted dataset, a day at a time; subclasses say how rows are read.

    The batches of a day are planned globally (plan_batches), so every reader gives a rank the same
    requests in the same order; `prefetch` loads a day on a background thread while the current one
    trains (or, for the first day, while the trainer sets up).

    Args:
        root: the dataset folder (holding meta.json).
        batch_size: requests per rank and step.
        rank, world_size: this rank's share of every day.
        seed: shuffle seed.
    """

    def __init__(self, root: Path, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.root = Path(root)
        self.meta = dataset.load_meta(self.root)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._pending: dict[tuple[dt.date, bool], Future] = {}

    def num_batches(self, day: dt.date) -> int:
        """Steps this rank takes on `day` (the same on every rank)."""
        return len(self.global_batch_sizes(day))

    def global_batch_sizes(self, day: dt.date) -> list[int]:
        """Requests of each global batch of `day`, all ranks together."""
        bounds = global_batch_bounds(self._num_requests(day), self.batch_size, self.world_size)
        return [end - start for start, end in bounds]

    def _num_requests(self, day: dt.date) -> int:
        name = schema.day_name(day)
        if name not in self.meta.days:
            raise DataError(f"day {name} is not in the dataset (it has {', '.join(self.meta.days)})",
                            file=self.root / schema.META_FILE, day=day)
        return self.meta.days[name]

    def _plan(self, day: dt.date, shuffle: bool) -> list[np.ndarray]:
        return plan_batches(self._num_requests(day), self.batch_size, self.rank, self.world_size, shuffle, self.seed, day)

    def load_rows(self, day: dt.date, rows: np.ndarray) -> DayArrays:
        """The day's rows at positions `rows` (of the day's log order), in that order."""
        raise NotImplementedError

    def _load(self, day: dt.date, shuffle: bool, start: int = 0) -> tuple[DayArrays, list[np.ndarray]]:
        plan = self._plan(day, shuffle)[start:]
        return self.load_rows(day, np.concatenate(plan) if plan else np.zeros(0, dtype=np.int64)), plan

    def prefetch(self, day: dt.date, shuffle: bool) -> None:
        """Start loading `day` in the background (iter_day then takes it from there).

        A reader holds one prefetched day: prefetching another drops the one not taken (cancelled if
        its load has not started), so a day nobody reads does not stay in memory.
        """
        key = (day, shuffle)
        if key not in self._pending:
            for dropped in self._pending.values():
                dropped.cancel()
            self._pending = {key: self._loader.submit(self._load, day, shuffle)}

    def iter_day(self, day: dt.date, shuffle: bool, start: int = 0) -> Iterator[Batch]:
        """This rank's batches of `day`; shuffle for training, log order for evaluation.

        The day's prefetched load, if any, is taken at this call, so a prefetch of the next day made
        before the batches are read does not drop it.

        Args:
            start: global batches of the day to skip (already trained before a restart).
        """
        return self._batches(day, shuffle, start, self._pending.pop((day, shuffle), None))

    def _batches(self, day: dt.date, shuffle: bool, start: int, pending: Future | None) -> Iterator[Batch]:
        if pending is not None:
            arrays, plan = pending.result()
            first = sum(len(rows) for rows in plan[:start])
            plan = plan[start:]
        else:
            (arrays, plan), first = self._load(day, shuffle, start), 0
        for batch_rows in plan:
            yield make_batch(arrays, slice(first, first + len(batch_rows)), self.meta.group_size)
            first += len(batch_rows)


class LocalReader(DayReader):
    """Reads a converted dataset from local or mounted storage with pyarrow (the embedded default)."""

    def load_rows(self, day: dt.date, rows: np.ndarray) -> DayArrays:
        return {name: values[rows] for name, values in load_day(self.root, day, self.meta).items()}
