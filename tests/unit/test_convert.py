"""The converter against the raw files it reads: every field of sampled requests, and every bad input."""

from __future__ import annotations

import datetime as dt
import gc
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


def _time(ts: float) -> tuple[int, int, int]:
    local = dt.datetime.fromtimestamp(ts, ZONE)
    return local.weekday() + 1, local.hour + 1, local.minute + 1


def _expected_row(root: Path, day: dt.date, rid: int, num_stages: int) -> dict:
    """The converted row of request `rid`, computed the slow, obvious way from the raw files."""
    table = pd.read_feather(raw.day_file(root, schema.ALL_STAGE_DIR, day))
    rows = table[table.request_id == rid]
    with open(raw.day_file(root, schema.REQUEST_DICT_DIR, day), "rb") as f:
        lists = pickle.load(f)[rid]
    with open(raw.day_file(root, schema.SEQ_DICT_DIR, day), "rb") as f:
        history = pickle.load(f)[rid]
    first = rows.iloc[0]
    row = {"request_id": rid, "request_timestamp": int(first.request_timestamp)}
    for name in ("user_id", "device_id", "age", "gender", "province"):
        row[name] = int(first[name]) + 1
    row["req_weekday"], row["req_hour"], row["req_minute"] = _time(first.request_timestamp / 1000)
    cand = {name: [] for name in schema.ITEM_FEATURES}
    labels, masks = [], []
    col = {name: i for i, name in enumerate(schema.REQUEST_ARRAY_COLUMNS)}
    for group in schema.GROUPS[num_stages]:
        for item in lists[group][: schema.GROUP_SIZE]:
            for name in ("video_id", "author_id", "category_level_two", "category_level_one", "upload_type"):
                cand[name].append(int(item[col[name]]) + 1)
            weekday, hour, minute = _time(item[col["upload_timestamp"]])
            cand["upload_weekday"].append(weekday)
            cand["upload_hour"].append(hour)
            cand["upload_minute"].append(minute)
            if group in schema.POSITIVE_INDEX_COLUMN:
                match = rows[(rows.video_id == item[0]) & (rows[group] == 1)]
                labels.append(30 - int(match[schema.POSITIVE_INDEX_COLUMN[group]].iloc[0]))
            else:
                labels.append(schema.NEGATIVE_LABEL[group])
            masks.append(1)
    row.update({f"cand_{k}": v for k, v in cand.items()})
    row["cand_label"], row["cand_mask"] = labels, masks
    seq = {name: i for i, name in enumerate(schema.SEQ_COLUMNS)}
    valid = history[:, seq["request_timestamp"]] > 0
    for name in schema.HISTORY_FEATURES:
        row[f"hist_{name}"] = [int(v) + 1 if ok else 0 for v, ok in zip(history[:, seq[name]], valid)]
    row["hist_len"] = int(valid.sum())
    return row


def _read_day(out: Path, day: dt.date) -> pa.Table:
    return pq.read_table(dataset.day_files(out, day), partitioning=None)


def test_every_field_of_sampled_requests_matches_the_raw_files(tiny_raw: Path, tiny_dataset: Path) -> None:
    meta = dataset.load_meta(tiny_dataset)
    for day in meta.day_list:
        table = _read_day(tiny_dataset, day)
        ids = table.column("request_id").to_numpy()
        for i in np.random.default_rng(0).choice(len(ids), size=3, replace=False):
            got = table.slice(int(i), 1).to_pylist()[0]
            assert got == _expected_row(tiny_raw, day, int(ids[i]), meta.num_stages)


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


def _corrupt(case: str, root: Path, day: dt.date) -> tuple[str, str]:
    """Apply one kind of damage to `day`; return (file folder, expected message fragment)."""
    table = raw.day_file(root, schema.ALL_STAGE_DIR, day)
    requests = raw.day_file(root, schema.REQUEST_DICT_DIR, day)
    seq = raw.day_file(root, schema.SEQ_DICT_DIR, day)
    rid = _first_request(root, day)
    if case == "missing file":
        requests.unlink()
        return requests.name, "file is missing"
    if case == "truncated feather":
        table.write_bytes(table.read_bytes()[: table.stat().st_size // 2])
        return table.name, "not a readable Arrow IPC"
    if case == "truncated pickle":
        seq.write_bytes(seq.read_bytes()[: seq.stat().st_size // 2])
        return seq.name, "not a readable pickle"
    if case == "missing column":
        _edit_table(table, lambda f: f.drop(columns=["province"]))
        return table.name, "column province: column is missing"
    if case == "wrong type":
        _edit_table(table, lambda f: f.assign(user_id=f.user_id.astype("float64")))
        return table.name, "column user_id: expected type int64, found double"
    if case == "request missing from request_id_dict":
        _edit_pickle(requests, lambda d: d.pop(rid))
        return requests.name, f"missing from request_id_dict/{day}.pkl, e.g. request {rid}"
    if case == "request missing from seq_effective_50_dict":
        _edit_pickle(seq, lambda d: d.pop(rid))
        return seq.name, f"e.g. request {rid}"
    if case == "positive with no rank index":
        _edit_table(table, lambda f: f.assign(rank_pos=np.where(f.request_id == rid, 0, f.rank_pos)))
        return table.name, "column rank_index: positive video"
    if case == "group smaller than its size":
        _edit_pickle(requests, lambda d: d[rid].__setitem__("coarse_neg", d[rid]["coarse_neg"][:7]))
        return requests.name, f"request {rid} has 7 coarse_neg items, fewer than the 10"
    if case == "id outside id_cnt":
        _edit_table(table, lambda f: f.assign(province=np.where(f.request_id == rid, 79, f.province)))
        return table.name, "column province: id 79 outside [0, 79)"
    raise AssertionError(case)


BAD_INPUTS = [
    "missing file", "truncated feather", "truncated pickle", "missing column", "wrong type",
    "request missing from request_id_dict", "request missing from seq_effective_50_dict",
    "positive with no rank index", "group smaller than its size", "id outside id_cnt",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_clearly_and_leaves_nothing_half_written(case: str, broken_raw: Path, tmp_path: Path) -> None:
    day = _last_day(broken_raw)
    file_name, fragment = _corrupt(case, broken_raw, day)
    out = tmp_path / "ds"
    with pytest.raises(DataError) as info:
        convert.convert(broken_raw, out, workers=2, progress=False)
    message = str(info.value)
    assert file_name in message and f"day {day}" in message and fragment in message, message
    assert not dataset.day_dir(out, day).exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "no temporary folder survives"
    assert not (out / schema.META_FILE).exists()
    for other in raw.list_days(broken_raw)[:-1]:  # the days that were fine are complete, or absent
        if dataset.day_dir(out, other).exists():
            assert dataset.count_requests(out, other) > 0


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


@pytest.mark.parametrize("spread", [1, 10**12], ids=["compact ids", "sparse ids"])
def test_request_index_equals_a_sort_of_the_rows_in_any_order(spread: int) -> None:
    """Both ways of mapping rows to requests (a direct table over compact ids, a hash otherwise) give what
    np.unique over the rows gives, with rows in a random order."""
    rng = np.random.default_rng(spread)
    ids = rng.choice(400, size=300, replace=False) * spread - 7
    rows = rng.permutation(np.repeat(np.arange(300), rng.integers(2, 6, 300)))  # request of each row
    assert (ids.max() - ids.min() < len(rows)) == (spread == 1), "each case takes its own way"
    fields = {name: rng.integers(0, 100, 300)[rows] for name in schema.REQUEST_COLUMNS}
    table = pa.table({"request_id": ids[rows], **fields})
    request_ids, row_request, got = convert.request_index(table, Path("x.feather"), dt.date(2024, 1, 13))
    expected_ids, first_row, inverse = np.unique(ids[rows], return_index=True, return_inverse=True)
    assert np.array_equal(request_ids, expected_ids) and np.array_equal(row_request, inverse)
    for name in schema.REQUEST_COLUMNS:
        assert np.array_equal(got[name], fields[name][first_row]), name
    fields["age"][np.flatnonzero(rows == rows[0])[-1]] += 1  # one row of a request disagrees
    with pytest.raises(DataError, match=f"column age: request-level value differs within request {ids[rows[0]]}"):
        convert.request_index(pa.table({"request_id": ids[rows], **fields}), Path("x.feather"), dt.date(2024, 1, 13))


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
