"""`lcron-data validate`: check a raw RecFlow root or a converted dataset against every invariant.

Each invariant is one named check, evaluated per day with array operations; the report says what was
checked, on how many days, and the first violation of each failed check (file, day, column, rule).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lcron_dist.data import convert, dataset, raw, reader, schema
from lcron_dist.data.errors import DataError


@dataclass
class ValidationReport:
    """Outcome of every named check: how often it held, and its first violations."""

    target: Path
    kind: str
    passed: dict[str, int] = field(default_factory=dict)
    failures: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failures

    def expect(self, name: str, holds: bool | np.ndarray, explain: Callable[[], DataError]) -> bool:
        """Record check `name`; `explain` builds the located error only when it fails."""
        if bool(np.all(holds)):
            self.passed[name] = self.passed.get(name, 0) + 1
            return True
        self.failures.setdefault(name, []).append(str(explain()))
        return False

    def guard(self, name: str, load: Callable[[], object]) -> object | None:
        """Run a loading step under check `name`; a DataError becomes a failure, not a crash."""
        try:
            value = load()
        except DataError as exc:
            self.failures.setdefault(name, []).append(str(exc))
            return None
        self.passed[name] = self.passed.get(name, 0) + 1
        return value

    def summary(self) -> str:
        names = list(dict.fromkeys([*self.passed, *self.failures]))
        lines = [f"validated {self.kind} {self.target}: {len(names)} checks"]
        for name in names:
            fails = self.failures.get(name, [])
            status = "FAIL" if fails else "ok  "
            lines.append(f"  {status} {name} ({self.passed.get(name, 0)} passed, {len(fails)} failed)")
            lines += [f"         {message}" for message in fails[:3]]
        lines.append("all checks passed" if self.ok else f"{len(self.failures)} check(s) failed")
        return "\n".join(lines)


def _validate_raw_day(report: ValidationReport, root: Path, day: dt.date, id_counts: dict[str, int]) -> None:
    table_path = raw.day_file(root, schema.ALL_STAGE_DIR, day)
    table = report.guard("files readable, columns present and int64", lambda: raw.read_table(table_path, day))
    show_path = raw.day_file(root, schema.REALSHOW_DIR, day)
    show = report.guard("files readable, columns present and int64", lambda: raw.read_table(show_path, day))
    requests = report.guard("files readable, columns present and int64", lambda: raw.load_request_dict(root, day))
    if table is None:
        return
    index = report.guard("request-level columns constant within a request",
                         lambda: convert.request_index(table, table_path, day))
    if index is None:
        return
    request_ids, row_request, fields = index
    col = {name: table.column(name).to_numpy() for name in schema.ALL_STAGE_COLUMNS}
    where = dict(file=table_path, day=day)

    for label in schema.STAGE_LABELS:
        report.expect("stage flags are 0/1", np.isin(col[label], (0, 1)),
                      lambda label=label: DataError("flag values must be 0 or 1", column=label, **where))
    disjoint = sum(col[label] for label in schema.DISJOINT_LABELS)
    report.expect("rerank_pos, rerank_neg, rank_neg, coarse_neg, prerank_neg disjoint", disjoint <= 1,
                  lambda: DataError(f"request {col['request_id'][disjoint > 1][0]} has an item in two disjoint groups", **where))
    clash = (col["rank_pos"] == 1) & ((col["rank_neg"] + col["coarse_neg"] + col["prerank_neg"]) > 0)
    report.expect("rank_pos items passed ranking (not a rank/coarse/prerank negative)", ~clash,
                  lambda: DataError(f"request {col['request_id'][clash][0]} has a rank_pos item that is also a negative", column="rank_pos", **where))
    stray = (col["realshow"] == 1) & (col["rerank_pos"] == 0)
    report.expect("realshow ⊂ rerank_pos", ~stray,
                  lambda: DataError(f"request {col['request_id'][stray][0]} shows an item that is not rerank_pos", column="realshow", **where))
    for group, index_col in schema.POSITIVE_INDEX_COLUMN.items():
        pos = col[index_col][col[group] == 1]
        report.expect(f"{index_col} in 1..{schema.MAX_POSITIVE_INDEX} on {group} rows",
                      (pos >= 1) & (pos <= schema.MAX_POSITIVE_INDEX),
                      lambda pos=pos, index_col=index_col: DataError(f"position {pos[(pos < 1) | (pos > schema.MAX_POSITIVE_INDEX)][0]} out of range", column=index_col, **where))
    for name in schema.ID_FIELDS:
        report.expect("ids within id_cnt", (col[name] >= 0) & (col[name] < id_counts[name]),
                      lambda name=name: DataError(f"id outside [0, {id_counts[name]})", column=name, **where))
    pair = np.sort(row_request * (int(col["video_id"].max()) + 1) + col["video_id"])
    report.expect("one row per (request, video)", bool(np.all(pair[1:] != pair[:-1])),
                  lambda: DataError("a (request_id, video_id) pair appears twice", column="video_id", **where))
    in_day = convert.on_day(fields["request_timestamp"], day)
    report.expect(f"request times fall on their day ({schema.TIME_ZONE})", in_day,
                  lambda: DataError(f"request {request_ids[~in_day][0]} is not on {day}", column="request_timestamp", **where))
    if show is not None:
        shown = col["realshow"] == 1
        same = show.num_rows == int(shown.sum()) and np.array_equal(
            np.sort(show.column("request_id").to_numpy() * 1_000_003 + show.column("video_id").to_numpy()),
            np.sort(col["request_id"][shown] * 1_000_003 + col["video_id"][shown]))
        report.expect("realshow file = realshow rows of all_stage", same,
                      lambda: DataError(f"{show.num_rows} rows vs {int(shown.sum())} realshow rows in all_stage", file=show_path, day=day))
    if requests is not None:
        _validate_request_dict(report, requests, day, request_ids, row_request, col)
    histories = report.guard("every request has a [50, 10] history", lambda: raw.load_histories(root, day, request_ids))
    if histories is not None:
        seq_where = dict(file=raw.day_file(root, schema.SEQ_DICT_DIR, day), day=day)
        valid = histories[:, :, schema.SEQ_COLUMNS.index("request_timestamp")] > 0
        suffix = np.all(valid[:, 1:] >= valid[:, :-1], axis=1)
        report.expect("histories are left-padded", suffix,
                      lambda: DataError(f"request {request_ids[~suffix][0]} has a valid row before a padding row", **seq_where))
        past = histories[:, :, schema.SEQ_COLUMNS.index("request_timestamp")]
        earlier = ~valid | (past < fields["request_timestamp"][:, None])
        report.expect("histories hold only earlier views", earlier,
                      lambda: DataError(f"request {request_ids[~earlier.all(1)][0]} has a history view not before it", column="request_timestamp", **seq_where))


def _validate_request_dict(report: ValidationReport, requests: raw.RequestDict, day: dt.date,
                           request_ids: np.ndarray, row_request: np.ndarray, col: dict[str, np.ndarray]) -> None:
    where = dict(file=requests.path, day=day)
    same_keys = np.array_equal(np.sort(requests.request_ids), request_ids)
    report.expect("request_id_dict keys = all_stage requests", same_keys,
                  lambda: DataError(f"{np.setxor1d(requests.request_ids, request_ids).size} request ids differ", column="request_id", **where))
    if not same_keys:
        return
    entry_request = np.searchsorted(request_ids, requests.request_ids)
    stride = int(col["video_id"].max()) + 1
    for label in schema.STAGE_LABELS:
        got = report.guard("request_id_dict lists are integer [n, 8]", lambda label=label: requests.group(label, day))
        if got is None:
            continue
        rows, lengths = got
        low, high = schema.LOGGED_PER_REQUEST[label]
        fits = (lengths >= low) & (lengths <= high)
        report.expect(f"logged items per request ({label}: {low}..{high})", fits,
                      lambda label=label, fits=fits, lengths=lengths: DataError(
                          f"request {requests.request_ids[~fits][0]} lists {lengths[~fits][0]} items", column=label, **where))
        listed = np.sort(np.repeat(entry_request, lengths) * stride + rows[:, 0])
        flagged = np.sort((row_request * stride + col["video_id"])[col[label] == 1])
        report.expect("request_id_dict lists = all_stage flags", np.array_equal(listed, flagged),
                      lambda label=label: DataError("listed items differ from the all_stage rows flagged with this label", column=label, **where))


def validate_raw(root: Path, days: list[dt.date] | None = None, progress: bool = True) -> ValidationReport:
    """Check a RecFlow raw root (the published layout) day by day."""
    root = Path(root)
    report = ValidationReport(root, "raw RecFlow root")
    id_counts = report.guard("id_cnt.pkl gives every id field (aliases agree)", lambda: raw.load_id_counts(root))
    if id_counts is None:
        return report
    for day in tqdm(days or raw.list_days(root), desc="validate", unit="day", disable=not progress):
        with raw.gc_paused():
            _validate_raw_day(report, root, day, id_counts)
    return report


def validate_dataset(root: Path, progress: bool = True) -> ValidationReport:
    """Check a converted dataset: meta.json, schema, labels, masks, ids and histories."""
    root = Path(root)
    report = ValidationReport(root, "converted dataset")
    meta = report.guard("meta.json readable and of this schema version", lambda: dataset.load_meta(root))
    if meta is None:
        return report
    on_disk = [schema.day_name(d) for d in dataset.list_days(root)]
    report.expect("meta.json days = day folders", on_disk == list(meta.days),
                  lambda: DataError(f"meta lists {list(meta.days)}, folders hold {on_disk}", file=root / schema.META_FILE))
    groups, size = meta.groups, meta.group_size
    seen: list[np.ndarray] = []
    for day in tqdm(meta.day_list, desc="validate", unit="day", disable=not progress):
        where = dict(file=dataset.day_dir(root, day), day=day)
        arrays = report.guard("day readable with the converted schema", lambda day=day: reader.load_day(root, day, meta))
        if arrays is None:
            continue
        seen.append(arrays["request_id"])
        report.expect("request counts match meta.json", len(arrays["request_id"]) == meta.days[schema.day_name(day)],
                      lambda: DataError(f"{len(arrays['request_id'])} rows, meta says {meta.days[schema.day_name(day)]}", **where))
        in_day = convert.on_day(arrays["request_timestamp"], day)
        report.expect(f"request times fall on their day ({meta.time_zone})", in_day,
                      lambda: DataError(f"request {arrays['request_id'][~in_day][0]} is not on {day}", column="request_timestamp", **where))
        mask = arrays["cand_mask"]
        report.expect("cand_mask is 0/1", np.isin(mask, (0, 1)), lambda: DataError("mask values must be 0/1", column="cand_mask", **where))
        real = mask == 1
        for name in [f"cand_{f}" for f in schema.ITEM_FEATURES] + ["cand_label"]:
            report.expect("padded candidates are all zero", np.where(real, True, arrays[name] == 0),
                          lambda name=name: DataError("non-zero value on a padded candidate", column=name, **where))
        report.expect("real candidates have a video id", np.where(real, arrays["cand_video_id"] > 0, True),
                      lambda: DataError("masked-in candidate with padding video id 0", column="cand_video_id", **where))
        label = arrays["cand_label"].reshape(len(mask), len(groups), size)
        real_g = real.reshape(label.shape)
        pos = label[:, 0]
        report.expect("positive labels in 10..29", np.where(real_g[:, 0], (pos >= schema.MAX_LABEL - schema.MAX_POSITIVE_INDEX) & (pos < schema.MAX_LABEL), True),
                      lambda: DataError("positive label outside 30 - index (index 1..20)", column="cand_label", **where))
        for g, group in enumerate(groups[1:], start=1):
            report.expect("negative labels match their group", np.where(real_g[:, g], label[:, g] == schema.NEGATIVE_LABEL[group], True),
                          lambda group=group: DataError(f"{group} label is not {schema.NEGATIVE_LABEL[group]}", column="cand_label", **where))
        for name, values in arrays.items():
            feature = name.removeprefix("cand_").removeprefix("hist_")
            if feature in meta.vocab_sizes:
                inside = (values >= 0) & (values < meta.vocab_sizes[feature])
                report.expect("ids within vocabulary sizes", inside,
                              lambda name=name, feature=feature: DataError(f"id outside [0, {meta.vocab_sizes[feature]})", column=name, **where))
        valid = arrays["hist_video_id"] > 0
        report.expect("hist_len = valid history positions", valid.sum(1) == arrays["hist_len"],
                      lambda: DataError("hist_len disagrees with non-padding history ids", column="hist_len", **where))
        report.expect("histories are left-padded", np.all(valid[:, 1:] >= valid[:, :-1]),
                      lambda: DataError("a valid history position precedes a padding one", column="hist_video_id", **where))
    if seen:
        ids = np.concatenate(seen)
        report.expect("request ids unique across days", np.unique(ids).size == ids.size,
                      lambda: DataError("a request id appears twice", file=root, column="request_id"))
    return report


def validate(path: Path, progress: bool = True) -> ValidationReport:
    """Validate a converted dataset (has meta.json) or a raw RecFlow root (has all_stage/)."""
    path = Path(path)
    if (path / schema.META_FILE).exists():
        return validate_dataset(path, progress)
    if (path / schema.ALL_STAGE_DIR).is_dir():
        return validate_raw(path, progress=progress)
    raise DataError(f"neither a converted dataset ({schema.META_FILE}) nor a raw root ({schema.ALL_STAGE_DIR}/)", file=path)
