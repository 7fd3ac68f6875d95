"""The converter against the raw files it reads: every field of every request, and every bad input."""

from __future__ import annotations

import datetime as dt
import functools
import gc
import json
import pickle
import shutil
import zoneinfo
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from lcron_dist.data import cli, convert, dataset, raw, schema, synth
from lcron_dist.data.errors import DataError

ZONE = zoneinfo.ZoneInfo(schema.TIME_ZONE)


@functools.cache
def _time(ts: float) -> tuple[int, int, int]:
    local = dt.datetime.fromtimestamp(ts, ZONE)
    return local.weekday() + 1, local.hour + 1, local.minute + 1


def _load(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f)


def _expected_day(root: Path, day: dt.date, num_stages: int) -> dict[int, dict]:
    """The converted row of every request of `day`, computed the slow, obvious way from the raw files."""
    table = pd.read_feather(raw.day_file(root, schema.ALL_STAGE_DIR, day))
    lists = _load(raw.day_file(root, schema.REQUEST_DICT_DIR, day))
    histories = _load(raw.day_file(root, schema.SEQ_DICT_DIR, day))
    position = {}  # (request, group, video) -> rank_index / rerank_index of that positive row
    for group, index_column in schema.POSITIVE_INDEX_COLUMN.items():
        flagged = table[table[group] == 1]
        for rid, video, index in zip(flagged.request_id, flagged.video_id, flagged[index_column]):
            position[rid, group, video] = int(index)
    col = {name: i for i, name in enumerate(schema.REQUEST_ARRAY_COLUMNS)}
    seq = {name: i for i, name in enumerate(schema.SEQ_COLUMNS)}
    rows = {}
    for first in table.drop_duplicates("request_id").itertuples():
        rid = int(first.request_id)
        row = {"request_id": rid, "request_timestamp": int(first.request_timestamp)}
        for name in ("user_id", "device_id", "age", "gender", "province"):
            row[name] = int(getattr(first, name)) + 1
        row["req_weekday"], row["req_hour"], row["req_minute"] = _time(first.request_timestamp / 1000)
        cand = {name: [] for name in schema.ITEM_FEATURES}
        labels, masks = [], []
        for group in schema.GROUPS[num_stages]:
            for item in lists[rid][group][: schema.GROUP_SIZE]:
                for name in ("video_id", "author_id", "category_level_two", "category_level_one", "upload_type"):
                    cand[name].append(int(item[col[name]]) + 1)
                weekday, hour, minute = _time(int(item[col["upload_timestamp"]]))
                cand["upload_weekday"].append(weekday)
                cand["upload_hour"].append(hour)
                cand["upload_minute"].append(minute)
                if group in schema.POSITIVE_INDEX_COLUMN:
                    labels.append(30 - position[rid, group, item[col["video_id"]]])
                else:
                    labels.append(schema.NEGATIVE_LABEL[group])
                masks.append(1)
        row.update({f"cand_{k}": v for k, v in cand.items()})
        row["cand_label"], row["cand_mask"] = labels, masks
        history = histories[rid]
        valid = history[:, seq["request_timestamp"]] > 0
        for name in schema.HISTORY_FEATURES:
            row[f"hist_{name}"] = [int(v) + 1 if ok else 0 for v, ok in zip(history[:, seq[name]], valid)]
        row["hist_len"] = int(valid.sum())
        rows[rid] = row
    return rows


def _read_day(out: Path, day: dt.date) -> pa.Table:
    return pq.read_table(dataset.day_files(out, day), partitioning=None)


def test_every_field_of_every_request_matches_the_raw_files(tiny_raw: Path, tiny_dataset: Path) -> None:
    meta = dataset.load_meta(tiny_dataset)
    for day in meta.day_list:
        expected = _expected_day(tiny_raw, day, meta.num_stages)
        got = _read_day(tiny_dataset, day).to_pylist()
        assert sorted(row["request_id"] for row in got) == sorted(expected), "one row per request of all_stage"
        for row in got:
            assert row == expected[row["request_id"]]


def test_meta_and_layout(tiny_raw: Path, tiny_dataset: Path) -> None:
    meta = dataset.load_meta(tiny_dataset)
    days = raw.list_days(tiny_raw)
    assert meta.day_list == days
    assert list(meta.groups) == list(schema.GROUPS[meta.num_stages])
    assert meta.num_candidates == 10 * len(meta.groups)
    assert meta.time_zone == "Asia/Shanghai"
    counts = raw.load_id_counts(tiny_raw)
    assert meta.vocab_sizes["video_id"] == counts["video_id"] + 1
    assert meta.vocab_sizes["req_hour"] == 25
    for day in days:
        requests = pd.read_feather(raw.day_file(tiny_raw, schema.ALL_STAGE_DIR, day)).request_id.nunique()
        assert meta.days[day.isoformat()] == requests
        table = _read_day(tiny_dataset, day)
        assert table.schema == dataset.arrow_schema(meta.num_candidates)
        assert table.num_rows == requests
        stamps = table.column("request_timestamp").to_numpy()
        assert np.all(np.diff(stamps) >= 0), "rows are in log order"
        assert pq.ParquetFile(dataset.day_files(tiny_dataset, day)[0]).metadata.row_group(0).column(0).compression == "ZSTD"


def test_reconvert_skips_complete_days_and_force_redoes_them(tiny_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    first = convert.convert(tiny_raw, out, progress=False)
    assert not any(r.skipped for r in first.results)
    again = convert.convert(tiny_raw, out, progress=False)
    assert all(r.skipped for r in again.results)
    assert [r.requests for r in again.results] == [r.requests for r in first.results]
    day = first.results[0].day
    before = dataset.day_files(out, day)[0].stat().st_mtime_ns
    forced = convert.convert(tiny_raw, out, days=[day], force=True, progress=False)
    assert not forced.results[0].skipped
    assert dataset.day_files(out, day)[0].stat().st_mtime_ns != before
    assert dataset.load_meta(out).day_list == raw.list_days(tiny_raw), "meta keeps every day on disk"
    with pytest.raises(DataError, match="converted with --stages 2"):
        convert.convert(tiny_raw, out, num_stages=3, progress=False)


def test_parallel_workers_write_the_same_tables(tiny_raw: Path, tmp_path: Path) -> None:
    serial = tmp_path / "serial"
    parallel = tmp_path / "parallel"
    convert.convert(tiny_raw, serial, progress=False)
    convert.convert(tiny_raw, parallel, workers=2, progress=False)
    for day in raw.list_days(tiny_raw):
        assert _read_day(serial, day).equals(_read_day(parallel, day))


def test_small_parts(tiny_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    convert.convert(tiny_raw, out, rows_per_file=50, progress=False)
    day = raw.list_days(tiny_raw)[0]
    files = dataset.day_files(out, day)
    assert len(files) > 1
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == dataset.load_meta(out).days[day.isoformat()]


# ----------------------------------------------------------------------------------------------------
# Bad input: a clear error naming file, day, column and rule; nothing half-written left behind
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def broken_raw(tiny_raw: Path, tmp_path: Path) -> Path:
    root = tmp_path / "raw"
    shutil.copytree(tiny_raw, root)
    return root


def _last_day(root: Path) -> dt.date:
    return raw.list_days(root)[-1]


def _edit_pickle(path: Path, edit) -> None:
    with open(path, "rb") as f:
        data = pickle.load(f)
    edit(data)
    with open(path, "wb") as f:
        pickle.dump(data, f)


def _edit_table(path: Path, edit) -> None:
    frame = pd.read_feather(path)
    frame = edit(frame)
    frame.reset_index(drop=True).to_feather(path)


def _first_request(root: Path, day: dt.date) -> int:
    return int(pd.read_feather(raw.day_file(root, schema.ALL_STAGE_DIR, day)).request_id.iloc[0])


def _with_id(array: np.ndarray, columns: tuple[str, ...], row: int, field: str, value: int) -> np.ndarray:
    """A copy of one request's array (a request_id_dict list or a history) with `field` at `row` set to `value`."""
    array = array.copy()
    array[row, columns.index(field)] = value
    return array


def _corrupt(case: str, root: Path, day: dt.date) -> tuple[str, str | None, str]:
    """Apply one kind of damage to `day`; return (file name, column or None, expected rule fragment)."""
    table = raw.day_file(root, schema.ALL_STAGE_DIR, day)
    requests = raw.day_file(root, schema.REQUEST_DICT_DIR, day)
    seq = raw.day_file(root, schema.SEQ_DICT_DIR, day)
    rid = _first_request(root, day)
    counts = raw.load_id_counts(root)
    if case == "missing file":
        requests.unlink()
        return requests.name, None, "file is missing"
    if case == "missing feather file":
        table.unlink()
        return table.name, None, "file is missing"
    if case == "truncated feather":
        table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
        return table.name, None, "not a readable Arrow IPC"
    if case == "truncated pickle":
        seq.write_bytes(seq.read_bytes()[: seq.stat().st_size // 2])
        return seq.name, None, "not a readable pickle"
    if case == "missing column":
        _edit_table(table, lambda f: f.drop(columns=["province"]))
        return table.name, "province", "column is missing"
    if case == "wrong type":
        _edit_table(table, lambda f: f.assign(user_id=f.user_id.astype("float64")))
        return table.name, "user_id", "expected type int64, found double"
    if case == "request missing from request_id_dict":
        _edit_pickle(requests, lambda d: d.pop(rid))
        return requests.name, "request_id", f"missing from request_id_dict/{day}.pkl, e.g. request {rid}"
    if case == "request only in request_id_dict":
        extra = rid + 10**9
        _edit_pickle(requests, lambda d: d.__setitem__(extra, d[rid]))
        return table.name, "request_id", f"1 request(s) of {day}.pkl are missing from all_stage/{day}.feather, e.g. request {extra}"
    if case == "request_id_dict entry not a dict":
        _edit_pickle(requests, lambda d: d.__setitem__(rid, d[rid]["rank_neg"]))
        return requests.name, "rank_pos", f"values must be dicts {{stage_label: array}}, the value of request {rid} is not"
    if case == "request id not an integer":
        _edit_pickle(seq, lambda d: d.__setitem__("r1", d[rid]))
        return seq.name, "request_id", "keys must be integer request ids, found 'r1'"
    if case == "request missing from seq_effective_50_dict":
        _edit_pickle(seq, lambda d: d.pop(rid))
        return seq.name, "request_id", f"e.g. request {rid}"
    if case == "positive with no rank index":
        _edit_table(table, lambda f: f.assign(rank_pos=np.where(f.request_id == rid, 0, f.rank_pos)))
        return table.name, "rank_index", "positive video"
    if case in ("rank_index 21", "rank_index 0"):
        index = int(case.split()[1])
        frame = pd.read_feather(table)
        video = frame.video_id[(frame.request_id == rid) & (frame.rank_pos == 1)].iloc[0]
        _edit_table(table, lambda f: f.assign(rank_index=np.where((f.request_id == rid) & (f.rank_pos == 1), index, f.rank_index)))
        return table.name, "rank_index", f"rank_index {index} of rank_pos video {video} in request {rid} is outside 1..20"
    if case == "request-level value changes within a request":
        _edit_table(table, lambda f: f.assign(age=np.where(f.index == f.index[f.request_id == rid][-1], f.age + 1, f.age)))
        return table.name, "age", f"request-level value differs within request {rid}"
    if case == "group smaller than its size":
        _edit_pickle(requests, lambda d: d[rid].__setitem__("coarse_neg", d[rid]["coarse_neg"][:7]))
        return requests.name, "coarse_neg", f"request {rid} has 7 coarse_neg items, fewer than the 10"
    if case == "id outside id_cnt":
        _edit_table(table, lambda f: f.assign(province=np.where(f.request_id == rid, 79, f.province)))
        return table.name, "province", f"id 79 of request {rid} is outside [0, 79) given by id_cnt.pkl"
    if case == "negative id":
        _edit_table(table, lambda f: f.assign(user_id=np.where(f.request_id == rid, -1, f.user_id)))
        return table.name, "user_id", f"id -1 of request {rid} is outside [0, {counts['user_id']})"
    if case == "negative video id of a positive in all_stage":
        _edit_table(table, lambda f: f.assign(video_id=np.where((f.request_id == rid) & (f.rank_pos == 1), -5, f.video_id)))
        return table.name, "video_id", f"id -5 of request {rid} (rank_pos row) is outside [0, {counts['video_id']})"
    if case in CANDIDATE_IDS:
        group, field, row, value_of = CANDIDATE_IDS[case]
        value = value_of(counts)
        _edit_pickle(requests, lambda d: d[rid].__setitem__(
            group, _with_id(d[rid][group], schema.REQUEST_ARRAY_COLUMNS, row, field, value)))
        return requests.name, field, f"id {value} of request {rid} ({group} list, item {row + 1}) is outside [0, {counts[field]})"
    if case in HISTORY_IDS:
        field, value_of = HISTORY_IDS[case]
        value = value_of(counts)

        def edit(histories: dict) -> None:
            assert histories[rid][-1, schema.SEQ_COLUMNS.index("request_timestamp")] > 0, "the newest view is not padding"
            histories[rid] = _with_id(histories[rid], schema.SEQ_COLUMNS, -1, field, value)
        _edit_pickle(seq, edit)
        return seq.name, field, f"id {value} of request {rid} (history position 50) is outside [0, {counts[field]})"
    if case == "history with 49 rows":
        _edit_pickle(seq, lambda d: d.__setitem__(rid, d[rid][1:]))
        return seq.name, None, f"history of request {rid} has 49 rows, not 50"
    if case == "history with 9 columns":
        _edit_pickle(seq, lambda d: d.__setitem__(rid, np.ascontiguousarray(d[rid][:, :9])))
        return seq.name, None, f"histories must all be integer arrays [n, 10], got int64 [50, 9] (request {rid})"
    if case == "history of floats":
        _edit_pickle(seq, lambda d: d.__setitem__(rid, d[rid].astype(np.float64)))
        return seq.name, None, f"got float64 [50, 10] (request {rid})"
    if case == "empty all_stage":
        _edit_table(table, lambda f: f.iloc[:0])
        return table.name, "request_id", "the day has no requests (the table has no rows"
    if case == "empty request_id_dict":
        _edit_pickle(requests, dict.clear)
        return requests.name, "request_id", f"holds no requests, but all_stage/{day}.feather has 200"
    raise AssertionError(case)


CANDIDATE_IDS = {  # case -> (group, field, row, bad value given the id counts)
    "candidate id outside id_cnt": ("rank_neg", "author_id", 0, lambda c: c["author_id"]),
    "positive candidate video outside id_cnt": ("rank_pos", "video_id", 9, lambda c: c["video_id"] + 7),
    "negative candidate id": ("coarse_neg", "category_level_one", 4, lambda c: -1),
}
HISTORY_IDS = {  # case -> (field, bad value given the id counts), put in the last (newest) history row
    "history id outside id_cnt": ("category_level_two", lambda c: c["category_level_two"]),
    "negative history id": ("video_id", lambda c: -2),
}
BAD_INPUTS = [
    "missing file", "truncated feather", "truncated pickle", "missing column", "wrong type",
    "request missing from request_id_dict", "request missing from seq_effective_50_dict",
    "positive with no rank index", "group smaller than its size", "id outside id_cnt",
]
"""Run over every day with 2 workers: the failing day leaves nothing behind, the others are complete or absent."""
BAD_DAYS = [
    "missing feather file", "request only in request_id_dict", "request_id_dict entry not a dict",
    "request id not an integer", "rank_index 21", "rank_index 0",
    "request-level value changes within a request", "negative id", "negative video id of a positive in all_stage",
    *CANDIDATE_IDS, *HISTORY_IDS, "history with 49 rows", "history with 9 columns", "history of floats",
    "empty all_stage", "empty request_id_dict",
]
"""Run on the broken day alone (one worker): the same error, at a fraction of the time."""


def _assert_located(error: DataError, file_name: str, day: dt.date, column: str | None, rule: str) -> None:
    """The message reads "file F, day D, column C: rule" (no column part where none applies)."""
    message = str(error)
    where = f"day {day}, column {column}: " if column else f"day {day}: "
    assert message.startswith("file ") and f"{file_name}, {where}" in message and rule in message, message


def _convert_fails_clearly(case: str, root: Path, out: Path, **options) -> dt.date:
    """Damage the last day of `root` as `case` says and convert: the error locates the damage, and nothing
    of the day, no temporary folder and no meta.json is left at `out`. Returns the damaged day."""
    day = _last_day(root)
    file_name, column, rule = _corrupt(case, root, day)
    with pytest.raises(DataError) as info:
        convert.convert(root, out, progress=False, **options)
    _assert_located(info.value, file_name, day, column, rule)
    assert not dataset.day_dir(out, day).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary folder survives"
    assert not (out / schema.META_FILE).exists()
    return day


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_clearly_and_leaves_nothing_half_written(case: str, broken_raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    day = _convert_fails_clearly(case, broken_raw, out, workers=2)
    for other in raw.list_days(broken_raw):  # the days that were fine are complete, or absent
        if other != day and dataset.day_dir(out, other).exists():
            assert dataset.count_requests(out, other) > 0


@pytest.mark.parametrize("case", BAD_DAYS)
def test_bad_day_fails_clearly_and_leaves_nothing_half_written(case: str, broken_raw: Path, tmp_path: Path) -> None:
    _convert_fails_clearly(case, broken_raw, tmp_path / "ds", days=[_last_day(broken_raw)])


def test_a_day_asked_for_and_absent_names_its_file(tiny_raw: Path, tmp_path: Path) -> None:
    day = dt.date(2023, 12, 31)
    with pytest.raises(DataError) as info:
        convert.convert(tiny_raw, tmp_path / "ds", days=[day], progress=False)
    _assert_located(info.value, f"{schema.ALL_STAGE_DIR}/{day}.feather", day, None, "file is missing")


def _edit_meta(edit):
    """An edit of meta.json's fields, as text."""
    def apply(text: str) -> str:
        fields = json.loads(text)
        edit(fields)
        return json.dumps(fields)
    return apply


DAMAGED_META = {  # case -> (edit of meta.json's text, column or None, expected rule fragment)
    "truncated": (lambda text: text[: len(text) // 2], None, "not valid JSON"),
    "not UTF-8": (lambda text: "\udcff" + text, None, "not valid JSON"),  # written as the byte 0xff
    "not an object": (lambda text: "[2, 3]", None, "expected a JSON object of fields, found list"),
    "field missing": (_edit_meta(lambda m: m.pop("days")), "days", "field is missing"),
    "number as a string": (_edit_meta(lambda m: m.update(num_stages="2")), "num_stages", 'expected int, found "2"'),
    "bool for an int": (_edit_meta(lambda m: m.update(seq_len=True)), "seq_len", "expected int, found true"),
    "ill-typed value": (_edit_meta(lambda m: m["vocab_sizes"].update(video_id=1.5)), "vocab_sizes", "expected dict[str, int]"),
    "days as a list": (_edit_meta(lambda m: m.update(days=list(m["days"]))), "days", "expected dict[str, int], found ["),
    "day name": (_edit_meta(lambda m: m.update(days={"2024-13-01": 5})), "days", "invalid day '2024-13-01'"),
    "unknown field": (_edit_meta(lambda m: m.update(stages=2)), "stages", "unknown field"),
    "newer schema": (_edit_meta(lambda m: m.update(schema_version=99, stages=2)), "schema_version", "schema version 99"),
}


@pytest.mark.parametrize("case", list(DAMAGED_META))
def test_damaged_meta_json_names_file_field_and_rule(case: str, tmp_path: Path) -> None:
    edit, column, rule = DAMAGED_META[case]
    dataset.write_meta(tmp_path, dataset.DatasetMeta(
        schema_version=schema.SCHEMA_VERSION, num_stages=2, groups=list(schema.GROUPS[2]), group_size=schema.GROUP_SIZE,
        num_candidates=schema.StageSetting(2).num_candidates, seq_len=schema.SEQ_LEN, time_zone=schema.TIME_ZONE,
        vocab_sizes=dataset.vocab_sizes(schema.RECFLOW_ID_COUNTS), days={"2024-01-13": 5}))
    assert dataset.load_meta(tmp_path).day_list == [dt.date(2024, 1, 13)]
    path = tmp_path / schema.META_FILE
    path.write_bytes(edit(path.read_text()).encode("utf-8", "surrogateescape"))
    with pytest.raises(DataError) as info:
        dataset.load_meta(tmp_path)
    where = f"file {path}, column {column}: " if column else f"file {path}: "
    assert str(info.value).startswith(where) and rule in str(info.value), str(info.value)


def test_cli_reports_bad_input_with_nonzero_exit(broken_raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    day = _last_day(broken_raw)
    _corrupt("missing column", broken_raw, day)
    code = cli.main(["--quiet", "convert", "--src", str(broken_raw), "--out", str(tmp_path / "ds")])
    err = capsys.readouterr().err
    assert code != 0
    assert "lcron-data convert: error:" in err and "column province" in err and str(day) in err
    assert gc.isenabled(), "the cycle collector, paused while a day is built, is back on after a failed day"


def test_pad_short_groups_masks_the_missing_items(broken_raw: Path, tmp_path: Path) -> None:
    day = _last_day(broken_raw)
    rid = _first_request(broken_raw, day)
    _corrupt("group smaller than its size", broken_raw, day)
    out = tmp_path / "ds"
    convert.convert(broken_raw, out, days=[day], pad_short_groups=True, progress=False)
    table = _read_day(out, day).to_pandas()
    row = table[table.request_id == rid].iloc[0]
    coarse = schema.GROUPS[2].index("coarse_neg") * 10
    assert list(row.cand_mask[coarse:coarse + 10]) == [1] * 7 + [0] * 3
    assert list(row.cand_label[coarse + 7:coarse + 10]) == [0, 0, 0]
    assert list(row.cand_video_id[coarse + 7:coarse + 10]) == [0, 0, 0]


def test_time_features_use_the_fixed_zone() -> None:
    # 2024-01-13 23:30 in Shanghai is 15:30 UTC: a host-zone implementation would get hour and day wrong.
    ts = dt.datetime(2024, 1, 13, 23, 30, tzinfo=ZONE).timestamp()
    got = convert.time_features(np.array([int(ts * 1000)]), "ms")
    assert (got["weekday"][0], got["hour"][0], got["minute"][0]) == (6, 24, 31)
    assert convert.on_day(np.array([int(ts * 1000)]), dt.date(2024, 1, 13))[0]


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_day_pickles_of_any_protocol_read_as_numpy_would(protocol: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(protocol)
    lists = {rid: {"rank_pos": rng.integers(0, 1000, size=(int(rng.integers(0, 4)), 8))} for rid in range(50)}
    path = tmp_path / "d.pkl"
    path.write_bytes(pickle.dumps(lists, protocol=protocol))
    loaded = raw._load_pickle(path, None)
    arrays = [v["rank_pos"] for v in loaded.values()]
    rows, lengths = raw.join_rows(arrays, 8, "lists", path, None)
    assert np.array_equal(rows, np.concatenate([v["rank_pos"] for v in lists.values()]))
    assert lengths.tolist() == [len(v["rank_pos"]) for v in lists.values()]
    heads, lengths = raw.join_rows(arrays, 8, "lists", path, None, head=2)
    assert np.array_equal(heads, np.concatenate([v["rank_pos"][:2] for v in lists.values()]))
    assert lengths.tolist() == [len(v["rank_pos"]) for v in lists.values()]
    with pytest.raises(DataError, match="must all be integer arrays"):
        raw.join_rows([np.zeros((2, 7), np.int64)], 8, "lists", path, None)

    # Arrays the fast path does not take (Fortran order, another dtype beside int64) are read as numpy reads them;
    # an object array is reported, not crashed on; a protocol <= 4 state without its version (older numpy) is read.
    odd = {0: np.asfortranarray(rng.integers(0, 1000, size=(3, 8))), 1: rng.integers(0, 9, size=(2, 8)).astype(np.int32),
           2: np.zeros((1, 8), np.int64)}
    path.write_bytes(pickle.dumps(odd, protocol=protocol))
    rows, lengths = raw.join_rows(list(raw._load_pickle(path, None).values()), 8, "lists", path, None)
    assert np.array_equal(rows, np.concatenate(list(odd.values()))) and lengths.tolist() == [3, 2, 1]
    path.write_bytes(pickle.dumps({7: np.array([[1] * 8], dtype=object)}, protocol=protocol))
    with pytest.raises(DataError, match="got object .1, 8. .request 7"):
        raw.join_rows(list(raw._load_pickle(path, None).values()), 8, "lists", path, None, keys=np.array([7]))
    if protocol < 5:
        array = odd[0]
        unversioned = raw._ArrayState([array.__reduce__()[2][1:]])  # (shape, dtype, is_fortran, data)
        rows, lengths = raw.join_rows([unversioned, unversioned], 8, "lists", path, None)
        assert np.array_equal(rows, np.concatenate([array, array])) and lengths.tolist() == [3, 3]


@pytest.mark.parametrize("spread", [1, 10**12], ids=["compact ids", "sparse ids"])
def test_request_index_equals_a_sort_of_the_rows_in_any_order(spread: int) -> None:
    """Both ways of mapping rows to requests (a direct table over compact ids, a hash otherwise) give what
    np.unique over the rows gives, with rows in a random order."""
    rng = np.random.default_rng(spread)
    ids = rng.choice(400, size=300, replace=False) * spread - 7
    rows = rng.permutation(np.repeat(np.arange(300), rng.integers(2, 6, 300)))  # request of each row
    assert (ids.max() - ids.min() < len(rows)) == (spread == 1), "each case takes its own way"
    fields = {name: rng.integers(0, 100, 300)[rows] for name in schema.REQUEST_COLUMNS}

    def chunked(columns: dict) -> pa.Table:  # in record batches, as a feather file is read
        return pa.Table.from_batches(pa.table(columns).to_batches(max_chunksize=128))

    table = chunked({"request_id": ids[rows], **fields})
    assert table.column("age").num_chunks > 4
    request_ids, row_request, got = convert.request_index(table, Path("x.feather"), dt.date(2024, 1, 13))
    expected_ids, first_row, inverse = np.unique(ids[rows], return_index=True, return_inverse=True)
    assert np.array_equal(request_ids, expected_ids) and np.array_equal(row_request, inverse)
    for name in schema.REQUEST_COLUMNS:
        assert np.array_equal(got[name], fields[name][first_row]), name
    late = next(r for r in rows[::-1] if np.flatnonzero(rows == r).min() >= 128)  # all its rows past chunk 0
    fields["age"][np.flatnonzero(rows == late)[0]] += 1  # one row of the request disagrees
    with pytest.raises(DataError, match=f"column age: request-level value differs within request {ids[late]}"):
        convert.request_index(chunked({"request_id": ids[rows], **fields}), Path("x.feather"), dt.date(2024, 1, 13))


@pytest.mark.parametrize("shuffle", ["requests", "rows"])
def test_conversion_does_not_depend_on_all_stage_row_order(shuffle: str, broken_raw: Path, tiny_raw: Path,
                                                             tmp_path: Path) -> None:
    day = _last_day(broken_raw)
    path = raw.day_file(broken_raw, schema.ALL_STAGE_DIR, day)
    frame = pd.read_feather(path)
    rng = np.random.default_rng(0)
    if shuffle == "requests":  # still grouped by request, groups in another order
        ids = frame.request_id.unique()
        rank = dict(zip(rng.permutation(ids), range(len(ids))))
        frame = frame.iloc[np.argsort(frame.request_id.map(rank).to_numpy(), kind="stable")]
    else:  # rows of a request scattered
        frame = frame.iloc[rng.permutation(len(frame))]
    frame.reset_index(drop=True).to_feather(path)
    shuffled, reference = tmp_path / "shuffled", tmp_path / "reference"
    convert.convert(broken_raw, shuffled, days=[day], progress=False)
    convert.convert(tiny_raw, reference, days=[day], progress=False)
    assert _read_day(shuffled, day).equals(_read_day(reference, day))


@pytest.mark.parametrize("protocol", [4, 5])
def test_shuffled_twin_with_other_pickles_converts_to_the_same_dataset(protocol: int, tiny_dataset: Path,
                                                                        tmp_path: Path) -> None:
    """RecFlow promises no row order and no pickle protocol: the twin of the same seed written with all_stage
    rows in a random order and protocol-N pickles converts to exactly the tables of the default twin."""
    root, out = tmp_path / "raw", tmp_path / "ds"
    synth.generate(synth.SynthConfig.preset("tiny", shuffle_rows=True, pickle_protocol=protocol), root, progress=False)
    meta = dataset.load_meta(tiny_dataset)
    convert.convert(root, out, num_stages=meta.num_stages, progress=False)
    for day in meta.day_list:
        ids = feather.read_table(raw.day_file(root, schema.ALL_STAGE_DIR, day), columns=["request_id"]).column(0).to_numpy()
        assert np.count_nonzero(np.diff(ids)) > 10 * len(np.unique(ids)), "the twin's rows are not grouped by request"
        assert raw.day_file(root, schema.REQUEST_DICT_DIR, day).read_bytes()[1] == protocol
        assert _read_day(out, day).equals(_read_day(tiny_dataset, day))
