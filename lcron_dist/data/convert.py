"""RecFlow raw files -> day-partitioned Parquet training examples (one row per request).

A day is converted with numpy/pyarrow array operations over all its requests at once; the only
per-request work left is pulling the arrays out of the published pickles (C-level `map`). RecFlow
promises no row order, so rows are mapped to requests without sorting them (request_index): a day
costs about the same in any row order. Memory is bounded by one day. Each day is written to a
temporary folder and renamed when complete.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import Manager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from lcron_dist.components.allocator import freed_memory_kept
from lcron_dist.data import dataset, raw, schema
from lcron_dist.data.errors import DataError

_ARRAY_COL = {name: i for i, name in enumerate(schema.REQUEST_ARRAY_COLUMNS)}
_SEQ_COL = {name: i for i, name in enumerate(schema.SEQ_COLUMNS)}
_ITEM_IDS = schema.HISTORY_FEATURES  # a candidate carries the same five item id fields as a history position
_CAND_FIELDS = (*_ITEM_IDS, "upload_timestamp")
_HIST_FIELDS = (*schema.HISTORY_FEATURES, "request_timestamp")
_PER_MINUTE = {"ms": 60_000, "s": 60}


def time_features(timestamps: np.ndarray, unit: str) -> dict[str, np.ndarray]:
    """1-based weekday (Monday = 1), hour and minute of epoch timestamps in RecFlow's time zone.

    The zone lookup runs once per value (local_timestamp); the fields are then plain integer arithmetic.

    Args:
        timestamps: int64 epoch times, any shape.
        unit: "ms" or "s".
    """
    zoned = pa.array(timestamps.reshape(-1), pa.int64()).cast(pa.timestamp(unit, tz=schema.TIME_ZONE))
    minutes = pc.local_timestamp(zoned).cast(pa.int64()).to_numpy() // _PER_MINUTE[unit]
    days, minute_of_day = np.divmod(minutes, 24 * 60)
    fields = {"weekday": (days + 3) % 7, "hour": minute_of_day // 60, "minute": minute_of_day % 60}  # 1970-01-01: Thursday
    return {k: (v.astype(np.int32) + 1).reshape(timestamps.shape) for k, v in fields.items()}


def on_day(timestamps_ms: np.ndarray, day: dt.date) -> np.ndarray:
    """Whether each epoch time (ms) falls on `day` in RecFlow's time zone."""
    local = pc.local_timestamp(pa.array(timestamps_ms, pa.int64()).cast(pa.timestamp("ms", tz=schema.TIME_ZONE)))
    return local.cast(pa.date32()).to_numpy(zero_copy_only=False) == np.datetime64(day.isoformat())


def _check_ids(values: np.ndarray, count: int, owners: Callable[[], np.ndarray], where: dict,
               valid: np.ndarray | None = None, context: Callable[[tuple[int, ...]], str] = lambda at: "") -> None:
    """Fail unless every (valid) raw id lies in [0, count), the range id_cnt.pkl gives.

    Args:
        values: ids, [rows] or [rows, k] (contiguous: a strided pass costs many times more).
        owners: builds the [rows] request ids of the rows (only called to name the culprit).
        valid: same shape as `values`; False where the id is padding and not checked.
        context: where in its request the id at this index sits, for the message.
    """
    # Fast path: padding is 0, so a plain min/max over everything almost always settles it.
    if values.size == 0 or (values.min() >= 0 and values.max() < count):
        return
    bad = (values < 0) | (values >= count)
    if valid is not None:
        bad &= valid
    if bad.any():
        at = tuple(np.argwhere(bad)[0])
        raise DataError(f"id {values[at]} of request {owners()[at[0]]}{context(at)} is outside [0, {count}) "
                        "given by id_cnt.pkl", **where)


def _encode_ids(values: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Shift checked raw ids by +1 so 0 is padding (and is set wherever `valid` is False)."""
    encoded = values.astype(np.int32)
    encoded += 1
    if valid is not None:
        encoded *= valid
    return encoded


def _inverse(permutation: np.ndarray) -> np.ndarray:
    """The inverse of a permutation of 0..n-1, in O(n) (an argsort would sort)."""
    inverse = np.empty(len(permutation), dtype=np.int64)
    inverse[permutation] = np.arange(len(permutation))
    return inverse


def _index_in(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """int64 index of each value's first occurrence in `table`, -1 where absent (a hash join, no sort)."""
    return pc.index_in(pa.array(values), value_set=pa.array(table)).fill_null(-1).to_numpy().astype(np.int64)


def _dense_codes(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of `ids` and each element's index into them, in O(len(ids)) in any order.

    A day's request ids usually span a compact range: a direct-address table over it (one scatter, a
    cumsum and one gather) is then a counting sort. Otherwise pyarrow's dictionary_encode hashes them and
    only the distinct ids are sorted. (np.unique would sort all rows: seconds on a RecFlow-size day.)
    """
    low, high = int(ids.min()), int(ids.max())
    if high - low < len(ids):  # the table is then no bigger than the ids themselves
        offset = ids - low
        seen = np.zeros(high - low + 1, bool)
        seen[offset] = True
        return np.flatnonzero(seen) + low, (np.cumsum(seen) - 1)[offset]
    encoded = pa.array(ids).dictionary_encode()  # dictionary: in order of first appearance
    order = np.argsort(encoded.dictionary.to_numpy())  # sorted index -> dictionary index
    return encoded.dictionary.to_numpy()[order], _inverse(order)[encoded.indices.to_numpy()]


def request_index(table: pa.Table, path: Path, day: dt.date) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Distinct requests of an all_stage table and their request-level fields, whatever the row order.

    RecFlow promises no row order: rows are mapped to requests in O(rows) (see _dense_codes).

    Returns:
        request_ids: [R] sorted distinct request ids;
        row_request: [rows] index into request_ids of each table row;
        fields: request-level column -> [R] values (checked constant within each request).
    """
    rid = table.column("request_id").to_numpy()
    if rid.size == 0:
        raise DataError("the day has no requests (the table has no rows, where every RecFlow day logs thousands): "
                        "re-export the day, or leave it out with --days", file=path, day=day, column="request_id")
    request_ids, row_request = _dense_codes(rid)
    some_row = np.empty(len(request_ids), np.int64)
    some_row[row_request] = np.arange(len(rid))  # a row of each request: which one does not matter, all must agree
    fields = {}
    for name in schema.REQUEST_COLUMNS:
        column = table.column(name)
        per_request = column.take(some_row).to_numpy()
        start = 0
        for chunk in column.chunks:  # chunk by chunk: a whole column's to_numpy would copy it first
            values = chunk.to_numpy()
            rows = slice(start, start + len(values))
            differs = values != per_request[row_request[rows]]
            if differs.any():
                raise DataError(f"request-level value differs within request {rid[rows][differs][0]}",
                                file=path, day=day, column=name)
            start = rows.stop
        fields[name] = per_request
    return request_ids, row_request, fields


@dataclass
class _Positives:
    """One positive group's all_stage rows, sorted by key = request index * stride + raw video id."""

    group: str
    keys: np.ndarray
    positions: np.ndarray  # the rows' rank_index / rerank_index
    stride: int


def _index_positives(table: pa.Table, row_request: np.ndarray, group: str, video_count: int, where: dict) -> _Positives:
    """Index the `group` == 1 rows of all_stage (`row_request`: each row's request index), after checking
    their video ids (the only all_stage ids the conversion uses) and their positions (1..MAX_POSITIVE_INDEX)."""
    is_pos = table.column(group).to_numpy() == 1
    video = table.column("video_id").to_numpy()[is_pos]
    owners = lambda: table.column("request_id").to_numpy()[is_pos]  # noqa: E731
    _check_ids(video, video_count, owners, dict(column="video_id", **where), context=lambda at: f" ({group} row)")
    index_column = schema.POSITIVE_INDEX_COLUMN[group]
    positions = table.column(index_column).to_numpy()[is_pos]
    outside = (positions < 1) | (positions > schema.MAX_POSITIVE_INDEX)
    if outside.any():
        at = np.argmax(outside)
        raise DataError(
            f"{index_column} {positions[at]} of {group} video {video[at]} in request {owners()[at]} "
            f"is outside 1..{schema.MAX_POSITIVE_INDEX}", column=index_column, **where,
        )
    stride = int(video.max(initial=0)) + 1
    keys = row_request[is_pos] * stride + video
    order = np.argsort(keys, kind="stable")
    return _Positives(group, keys[order], positions[order], stride)


def _positive_labels(
    positives: _Positives, request_ids: np.ndarray, req: np.ndarray, video: np.ndarray, path: Path, day: dt.date
) -> np.ndarray:
    """Graded labels of positive items (index `req` into request_ids, raw video id `video`)."""
    group, keys, index_column = positives.group, positives.keys, schema.POSITIVE_INDEX_COLUMN[positives.group]
    wanted = req * positives.stride + video
    at = np.minimum(np.searchsorted(keys, wanted), max(len(keys) - 1, 0))
    found = (keys[at] == wanted) & (video < positives.stride) if len(keys) else np.zeros(len(wanted), bool)
    if not found.all():
        miss = np.flatnonzero(~found)[0]
        raise DataError(
            f"positive video {video[miss]} of request {request_ids[req[miss]]} in request_id_dict has no {group} row "
            f"with a {index_column} in all_stage", file=path, day=day, column=index_column,
        )
    return (schema.MAX_LABEL - positives.positions[at]).astype(np.int8)


def build_day(
    root: Path, day: dt.date, setting: schema.StageSetting, id_counts: dict[str, int], pad_short_groups: bool = False
) -> pa.Table:
    """Convert one raw day into a table of training examples (see dataset.arrow_schema).

    Args:
        root: RecFlow raw root.
        day: the day to convert.
        setting: 2- or 3-stage candidate layout.
        id_counts: vocabulary sizes from id_cnt.pkl.
        pad_short_groups: pad a group with fewer than 10 logged items (masked out) instead of failing.
    """
    table_path = raw.day_file(root, schema.ALL_STAGE_DIR, day)
    columns_needed = ("request_id", *schema.REQUEST_COLUMNS, "video_id", *[
        c for g in setting.groups if g in schema.POSITIVE_INDEX_COLUMN for c in (g, schema.POSITIVE_INDEX_COLUMN[g])])
    table = raw.read_table(table_path, day, columns_needed)
    request_ids, row_request, request_fields = request_index(table, table_path, day)
    table_where = dict(file=table_path, day=day)
    positives = {g: _index_positives(table, row_request, g, id_counts["video_id"], table_where)
                 for g in setting.groups if g in schema.POSITIVE_INDEX_COLUMN}
    del table, row_request  # a day's raw inputs are released one by one: memory peaks at one of them
    # Chronological order within the day, so a reader without shuffling replays the log.
    order = np.lexsort((request_ids, request_fields["request_timestamp"]))  # output row -> sorted index
    columns = _candidate_columns(root, day, setting, id_counts, pad_short_groups, positives, request_ids, order)

    request_ids = request_ids[order]
    request_fields = {name: values[order] for name, values in request_fields.items()}
    columns["request_id"] = request_ids
    columns["request_timestamp"] = request_fields["request_timestamp"]
    for name in ("user_id", "device_id", "age", "gender", "province"):
        _check_ids(request_fields[name], id_counts[name], lambda: request_ids, dict(column=name, **table_where))
        columns[name] = _encode_ids(request_fields[name])
    for unit, values in time_features(request_fields["request_timestamp"], "ms").items():
        columns[f"req_{unit}"] = values

    history = _split_fields(raw.load_histories(root, day, request_ids), _SEQ_COL, _HIST_FIELDS)  # each [R, 50]
    hist_valid = history["request_timestamp"] > 0
    seq_path = raw.day_file(root, schema.SEQ_DICT_DIR, day)
    for name in schema.HISTORY_FEATURES:
        _check_ids(history[name], id_counts[name], lambda: request_ids, dict(file=seq_path, day=day, column=name),
                   hist_valid, lambda at: f" (history position {at[1] + 1})")
        columns[f"hist_{name}"] = _encode_ids(history[name], hist_valid)
    columns["hist_len"] = hist_valid.sum(axis=1).astype(np.int32)

    arrow = dataset.arrow_schema(setting.num_candidates)
    arrays = []
    for f in arrow:
        values = columns[f.name]
        if pa.types.is_fixed_size_list(f.type):
            arrays.append(pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), f.type.value_type), f.type.list_size))
        else:
            arrays.append(pa.array(values, f.type))
    return pa.Table.from_arrays(arrays, schema=arrow)


def _candidate_columns(
    root: Path, day: dt.date, setting: schema.StageSetting, id_counts: dict[str, int], pad_short_groups: bool,
    positives: dict[str, _Positives], request_ids: np.ndarray, order: np.ndarray,
) -> dict[str, np.ndarray]:
    """The cand_* columns of a day from request_id_dict, in output order.

    Args:
        positives: all_stage's positive rows by group (their positions give the labels).
        request_ids: the day's sorted distinct request ids.
        order: output row -> index into request_ids.
    """
    table_path = raw.day_file(root, schema.ALL_STAGE_DIR, day)
    requests = raw.load_request_dict(root, day)
    if len(requests.request_ids) == 0:
        raise DataError(f"holds no requests, but {table_path.parent.name}/{table_path.name} has {len(request_ids)}",
                        file=requests.path, day=day, column="request_id")
    entry_request = _index_in(requests.request_ids, request_ids)  # file order -> sorted index, -1 if not in all_stage
    unlisted = np.ones(len(request_ids), bool)
    unlisted[entry_request[entry_request >= 0]] = False
    for missing, there, here in (
        (request_ids[unlisted], table_path, requests.path),
        (np.sort(requests.request_ids[entry_request < 0]), requests.path, table_path),
    ):
        if missing.size:
            raise DataError(
                f"{missing.size} request(s) of {there.name} are missing from {here.parent.name}/{here.name}, "
                f"e.g. request {missing[0]}", file=here, day=day, column="request_id",
            )

    # Assembled in request_id_dict order and put in output order at the end.
    blocks, present = [], []
    for group in setting.groups:
        rows, lengths = requests.group(group, day, head=schema.GROUP_SIZE)  # research pipeline: the first 10
        short = lengths < schema.GROUP_SIZE
        if short.any() and not pad_short_groups:
            i = np.flatnonzero(short)[0]
            raise DataError(
                f"request {requests.request_ids[i]} has {lengths[i]} {group} items, fewer than the "
                f"{schema.GROUP_SIZE} a group needs (use --pad-short-groups to pad and mask them)",
                file=requests.path, day=day, column=group,
            )
        present.append(np.arange(schema.GROUP_SIZE) < lengths[:, None])  # [R, 10]
        blocks.append(_fill(rows, present[-1]))
    dict_ids, dict_path = requests.request_ids, requests.path
    del requests, rows
    cand = _split_fields(np.concatenate(blocks, axis=1), _ARRAY_COL, _CAND_FIELDS)  # each [R, N]
    del blocks
    mask = np.concatenate(present, axis=1)

    def where_listed(at: tuple[int, ...]) -> str:
        group, item = divmod(at[1], schema.GROUP_SIZE)
        return f" ({setting.groups[group]} list, item {item + 1})"

    for name in _ITEM_IDS:
        _check_ids(cand[name], id_counts[name], lambda: dict_ids, dict(file=dict_path, day=day, column=name), mask,
                   where_listed)

    labels = []  # checked ids first: an impossible video id is reported as such, not as an unmatched positive
    for g, group in enumerate(setting.groups):
        if group in positives:
            video = cand["video_id"][:, g * schema.GROUP_SIZE:(g + 1) * schema.GROUP_SIZE][present[g]]
            req = np.repeat(entry_request, present[g].sum(axis=1))
            labels.append(_fill(_positive_labels(positives[group], request_ids, req, video, table_path, day), present[g]))
        else:
            labels.append(np.where(present[g], schema.NEGATIVE_LABEL[group], 0).astype(np.int8))
    columns = {"cand_label": np.concatenate(labels, axis=1), "cand_mask": mask.view(np.int8)}
    for name in _ITEM_IDS:
        columns[f"cand_{name}"] = _encode_ids(cand[name], mask)
    for unit, values in time_features(cand["upload_timestamp"], "s").items():
        columns[f"cand_upload_{unit}"] = values * mask
    file_row = _inverse(entry_request)[order]  # output row -> position in request_id_dict
    return {name: values[file_row] for name, values in columns.items()}


def _split_fields(grid: np.ndarray, index: dict[str, int], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Contiguous copies of the named last-axis fields of `grid`, taken in one gather (cheaper than
    strided passes over the whole grid for every field)."""
    return dict(zip(names, np.moveaxis(grid, -1, 0)[[index[name] for name in names]]))


def _fill(rows: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Lay a group's rows ([sum of present, ...], request after request) out as [R, 10, ...], zeros where absent."""
    if present.all():
        return rows.reshape(*present.shape, *rows.shape[1:])
    block = np.zeros((*present.shape, *rows.shape[1:]), rows.dtype)
    block[present] = rows
    return block


def write_day(table: pa.Table, out: Path, day: dt.date, rows_per_file: int, force: bool) -> None:
    """Write a day's parts into a temporary folder, then move it into place in one rename."""
    final = dataset.day_dir(out, day)
    tmp = out / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for part, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
            pq.write_table(table.slice(start, rows_per_file), tmp / f"part-{part:05d}.parquet",
                           compression="zstd", row_group_size=min(rows_per_file, 8192))
        if final.exists() and force:
            old = out / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@dataclass
class DayResult:
    day: dt.date
    requests: int
    seconds: float
    skipped: bool = False


def convert_days(
    src: Path, out: Path, days: list[dt.date], num_stages: int, id_counts: dict[str, int],
    pad_short_groups: bool, rows_per_file: int, force: bool, done: Callable[[dt.date], None] = lambda day: None,
) -> list[DayResult]:
    """Convert and write `days` in order; runs in one worker.

    Each day's Parquet write runs on a writer thread while the next day is built: pyarrow releases
    the GIL while encoding, so the write overlaps the (GIL-bound) unpickling of the next day. At most
    one built day waits for its write, so memory stays bounded by two days. Memory freed by a day is
    kept for the next (components.allocator). A day already complete is skipped unless `force`.
    """
    results = []
    with freed_memory_kept(), ThreadPoolExecutor(max_workers=1) as writer:
        pending: tuple[Future, DayResult] | None = None

        def finish() -> None:
            future, result = pending
            future.result()
            result.seconds = time.perf_counter() - result.seconds
            results.append(result)
            done(result.day)

        for day in days:
            if dataset.day_dir(out, day).exists() and not force:
                results.append(DayResult(day, dataset.count_requests(out, day), 0.0, skipped=True))
                done(day)
                continue
            start = time.perf_counter()
            with raw.gc_paused():
                table = build_day(src, day, schema.StageSetting(num_stages), id_counts, pad_short_groups)
            if pending is not None:
                finish()
            # seconds holds the start until the write is done: a day's time is build + write.
            pending = (writer.submit(write_day, table, out, day, rows_per_file, force), DayResult(day, table.num_rows, start))
        if pending is not None:
            finish()
    return results


@dataclass
class ConvertReport:
    out: Path
    results: list[DayResult] = field(default_factory=list)
    seconds: float = 0.0
    """Wall time of the whole conversion (days overlap: a day's write runs beside the next build)."""
    workers: int = 1

    def summary(self) -> str:
        done = [r for r in self.results if not r.skipped]
        total = sum(r.requests for r in done)
        lines = [f"converted {len(done)} day(s), skipped {len(self.results) - len(done)} complete day(s) -> {self.out}"]
        for r in self.results:
            note = "skipped (complete; --force to redo)" if r.skipped else f"{r.seconds:6.2f} s, {r.requests / max(r.seconds, 1e-9):,.0f} requests/s"
            lines.append(f"  {r.day}  {r.requests:>9,} requests  {note}")
        if done:
            rate = total / max(self.seconds, 1e-9)
            lines.append(f"  total {total:,} requests in {self.seconds:.1f} s: {rate:,.0f} requests/s, "
                         f"{rate / self.workers:,.0f} per worker ({self.workers} worker(s))")
        return "\n".join(lines)


def convert(
    src: Path,
    out: Path,
    num_stages: int = 2,
    days: list[dt.date] | None = None,
    workers: int = 1,
    force: bool = False,
    pad_short_groups: bool = False,
    rows_per_file: int = 65_536,
    progress: bool = True,
) -> ConvertReport:
    """Convert raw RecFlow days under `src` into a Parquet dataset at `out` and (re)write meta.json."""
    src, out = Path(src), Path(out)
    if num_stages not in schema.GROUPS:
        raise ValueError(f"--stages must be one of {sorted(schema.GROUPS)}, got {num_stages}")
    available = raw.list_days(src)
    if days is None:
        days = available
    else:
        absent = [d for d in days if d not in available]
        if absent:
            raise DataError("file is missing (the day was asked for, and no folder has a file of it)",
                            file=raw.day_file(src, schema.ALL_STAGE_DIR, absent[0]), day=absent[0])
    id_counts = raw.load_id_counts(src)
    out.mkdir(parents=True, exist_ok=True)
    if (out / schema.META_FILE).exists():
        existing = dataset.load_meta(out)
        if existing.num_stages != num_stages:
            raise DataError(
                f"dataset was converted with --stages {existing.num_stages}, not {num_stages}: use another --out",
                file=out / schema.META_FILE, column="num_stages",
            )

    report = ConvertReport(out)
    args = (num_stages, id_counts, pad_short_groups, rows_per_file, force)
    bar = tqdm(total=len(days), desc="convert", unit="day", disable=not progress)
    start = time.perf_counter()
    if workers <= 1:
        report.results = convert_days(src, out, days, *args, done=lambda day: bar.update())
    else:
        # Each worker takes every W-th day, so its writer thread can overlap its own days.
        with Manager() as manager, ProcessPoolExecutor(max_workers=workers) as pool:
            finished = manager.Queue()
            futures = [pool.submit(convert_days, src, out, days[w::workers], *args, done=finished.put)
                       for w in range(workers)]
            while not all(f.done() for f in futures):
                try:
                    finished.get(timeout=0.2)
                    bar.update()
                except queue.Empty:
                    pass
                failed = [f for f in futures if f.done() and f.exception() is not None]
                if failed:
                    for other in futures:
                        other.cancel()
                    raise failed[0].exception()
            report.results = sorted((r for f in futures for r in f.result()), key=lambda r: r.day)
    bar.close()
    report.seconds = time.perf_counter() - start
    report.workers = workers

    all_days = dataset.list_days(out)
    dataset.write_meta(out, dataset.DatasetMeta(
        schema_version=schema.SCHEMA_VERSION,
        num_stages=num_stages,
        groups=list(schema.GROUPS[num_stages]),
        group_size=schema.GROUP_SIZE,
        num_candidates=schema.StageSetting(num_stages).num_candidates,
        seq_len=schema.SEQ_LEN,
        time_zone=schema.TIME_ZONE,
        vocab_sizes=dataset.vocab_sizes(id_counts),
        days={schema.day_name(d): dataset.count_requests(out, d) for d in all_days},
        source=str(src.resolve()),
    ))
    return report
