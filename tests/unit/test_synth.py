"""The synthetic RecFlow twin: raw layout, invariants, histories, determinism and calibration."""

from __future__ import annotations

import datetime as dt
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.feather as feather
import pytest

from lcron_dist.data import cli, schema, synth

CONFIG = synth.SynthConfig.preset("tiny")
DAYS = [schema.day_name(day) for day in CONFIG.day_list]
FLAGS = list(schema.STAGE_LABELS)
FEEDBACK = ["playing_time", "effective_view", "long_view", "like", "follow", "forward", "comment"]


@dataclass
class Twin:
    root: Path
    report: synth.SynthReport
    all_stage: pd.DataFrame  # every day, with a 'day' column
    request_dicts: dict[str, dict]
    seq_dicts: dict[str, dict]
    id_cnt: dict[str, int]


def _load_pickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Twin:
    root = tmp_path_factory.mktemp("synth") / "raw"
    report = synth.generate(CONFIG, root, progress=False)
    frames = [pd.read_feather(root / schema.ALL_STAGE_DIR / f"{day}.feather").assign(day=day) for day in DAYS]
    return Twin(
        root=root, report=report, all_stage=pd.concat(frames, ignore_index=True),
        request_dicts={day: _load_pickle(root / schema.REQUEST_DICT_DIR / f"{day}.pkl") for day in DAYS},
        seq_dicts={day: _load_pickle(root / schema.SEQ_DICT_DIR / f"{day}.pkl") for day in DAYS},
        id_cnt=_load_pickle(root / schema.ID_CNT_PATH),
    )


def test_layout_files_columns_and_dtypes(twin: Twin) -> None:
    expected = {f"{folder}/{day}.{ext}" for day in DAYS for folder, ext in (
        (schema.ALL_STAGE_DIR, "feather"), (schema.REALSHOW_DIR, "feather"),
        (schema.REQUEST_DICT_DIR, "pkl"), (schema.SEQ_DICT_DIR, "pkl"))}
    assert set(_files(twin.root)) == expected | {schema.ID_CNT_PATH, synth.REPORT_PATH}  # no temporary files left
    for folder in (schema.ALL_STAGE_DIR, schema.REALSHOW_DIR):
        for day in DAYS:
            table = feather.read_table(twin.root / folder / f"{day}.feather")
            assert table.schema.names == list(schema.ALL_STAGE_COLUMNS)
            assert all(t == pa.int64() for t in table.schema.types)


def test_pickle_structures(twin: Twin) -> None:
    for day in DAYS:
        requests, seqs = twin.request_dicts[day], twin.seq_dicts[day]
        assert len(requests) == CONFIG.requests_per_day
        assert all(type(key) is int for key in requests)
        assert set(requests) == set(twin.all_stage.loc[twin.all_stage["day"] == day, "request_id"])
        for entry in requests.values():
            assert list(entry) == FLAGS
            for label, array in entry.items():
                low, high = schema.LOGGED_PER_REQUEST[label]
                assert array.dtype == np.int64 and array.ndim == 2
                assert array.shape[1] == len(schema.REQUEST_ARRAY_COLUMNS) and low <= len(array) <= high
        assert set(seqs) == set(requests)  # every request has a history key
        for history in seqs.values():
            assert history.dtype == np.int64 and history.shape == (schema.SEQ_LEN, len(schema.SEQ_COLUMNS))
            valid = history[:, 7] > 0
            assert np.all(np.diff(valid.astype(int)) >= 0)  # left-padded: the valid rows are a suffix
            assert not history[~valid].any()


def test_request_dict_agrees_with_all_stage(twin: Twin) -> None:
    rows = []
    for day in DAYS:
        for request_id, entry in twin.request_dicts[day].items():
            for label, array in entry.items():
                rows.append(pd.DataFrame(array, columns=schema.REQUEST_ARRAY_COLUMNS).assign(
                    request_id=request_id, label=label))
    logged = pd.concat(rows, ignore_index=True)
    for label in FLAGS:
        expected = twin.all_stage[twin.all_stage[label] == 1].set_index(["request_id", "video_id"]).sort_index()
        got = logged[logged["label"] == label].set_index(["request_id", "video_id"]).sort_index()
        assert got.index.equals(expected.index), label
        for column in schema.REQUEST_ARRAY_COLUMNS[1:]:
            np.testing.assert_array_equal(got[column], expected[column], err_msg=f"{label}.{column}")


def test_all_stage_invariants(twin: Twin) -> None:
    df = twin.all_stage
    assert not df.duplicated(["request_id", "video_id"]).any()  # one row per (request, video)
    assert df[FLAGS].isin([0, 1]).all().all()
    assert (df[list(schema.DISJOINT_LABELS)].sum(axis=1) == 1).all()  # disjoint, and every row is logged once
    assert (df["rerank_pos"] >= df["realshow"]).all()
    assert (df["rerank_pos"] + df["rerank_neg"] >= df["rank_pos"]).all()
    for label, column in schema.POSITIVE_INDEX_COLUMN.items():
        np.testing.assert_array_equal(df[column] > 0, df[label] == 1)
        positions = df.loc[df[label] == 1, ["request_id", column]]
        assert positions[column].between(1, schema.MAX_POSITIVE_INDEX).all()
        assert not positions.duplicated().any()
    counts = df.groupby("request_id")[FLAGS].sum()
    for label, (low, high) in schema.LOGGED_PER_REQUEST.items():
        assert counts[label].between(low, high).all(), label
    assert df.groupby("request_id")[list(schema.REQUEST_COLUMNS)].nunique().eq(1).all().all()
    assert not df.loc[df["realshow"] == 0, FEEDBACK].any().any()
    shown = df[df["realshow"] == 1]
    assert (shown["playing_time"] <= shown["duration"]).all()
    assert 0.2 < shown["effective_view"].mean() < 0.9
    for day in DAYS:
        realshow = pd.read_feather(twin.root / schema.REALSHOW_DIR / f"{day}.feather")
        expected = df[(df["day"] == day) & (df["realshow"] == 1)].drop(columns="day").reset_index(drop=True)
        pd.testing.assert_frame_equal(realshow, expected)


def test_rerank_reorders_the_ranking_stage(twin: Twin) -> None:
    positives = twin.all_stage[twin.all_stage["rank_pos"] == 1]
    assert ((positives["rank_index"] <= 5) & (positives["rerank_neg"] == 1)).sum() > 20
    assert ((positives["rank_index"] > 15) & (positives["rerank_pos"] == 1)).sum() > 20


def test_times_and_request_ids(twin: Twin) -> None:
    df = twin.all_stage
    local = pd.to_datetime(df["request_timestamp"], unit="ms", utc=True).dt.tz_convert(schema.TIME_ZONE)
    np.testing.assert_array_equal(local.dt.strftime("%Y-%m-%d"), df["day"])
    assert (df["upload_timestamp"] * 1000 < df["request_timestamp"]).all()
    assert df.groupby("request_id")["day"].nunique().eq(1).all()
    assert df["request_id"].nunique() == CONFIG.days * CONFIG.requests_per_day


def test_id_ranges_and_id_cnt(twin: Twin) -> None:
    counts = twin.id_cnt
    assert set(counts) == set(schema.ID_FIELDS) | set(schema.ID_CNT_ALIASES)
    for alias, field in schema.ID_CNT_ALIASES.items():
        assert counts[alias] == counts[field]
    for field in ("age", "gender", "province", "category_level_one", "category_level_two", "upload_type"):
        assert counts[field] == schema.RECFLOW_ID_COUNTS[field]
    assert (counts["user_id"], counts["device_id"], counts["video_id"], counts["author_id"]) == (
        CONFIG.num_users, CONFIG.num_devices, CONFIG.num_videos, CONFIG.num_authors)
    for field in schema.ID_FIELDS:
        assert twin.all_stage[field].between(0, counts[field] - 1).all(), field
    assert twin.all_stage["category_level_two"].nunique() > 100  # the real-size vocabulary is in use
    histories = np.concatenate([np.stack(list(seqs.values())) for seqs in twin.seq_dicts.values()])
    valid = histories[histories[:, :, 7] > 0]
    for index, field in enumerate(schema.SEQ_COLUMNS[:5]):
        assert ((valid[:, index] >= 0) & (valid[:, index] < counts[field])).all(), field


def test_histories_are_the_last_effective_views_of_earlier_requests(twin: Twin) -> None:
    """Slow reference: rebuild every history from the logged realshow rows of the same user."""
    df = twin.all_stage
    views = df[df["effective_view"] == 1].sort_values(["request_timestamp", "rerank_index"])
    columns = ["video_id", "author_id", "category_level_two", "category_level_one", "upload_type",
               "upload_timestamp", "duration", "request_timestamp", "playing_time", "request_id"]
    assert columns == list(schema.SEQ_COLUMNS)
    by_user = {user: group[columns].to_numpy() for user, group in views.groupby("user_id")}
    requests = df.drop_duplicates("request_id")[["day", "request_id", "user_id", "request_timestamp"]]
    last_day_start = requests.loc[requests["day"] == DAYS[-1], "request_timestamp"].min()
    from_earlier_days = 0
    for day, request_id, user, ts in requests.itertuples(index=False):
        past = by_user.get(user, np.zeros((0, len(columns)), np.int64))
        past = past[past[:, 7] < ts][-schema.SEQ_LEN:]
        expected = np.zeros((schema.SEQ_LEN, len(columns)), np.int64)
        expected[schema.SEQ_LEN - len(past):] = past
        np.testing.assert_array_equal(twin.seq_dicts[day][request_id], expected, err_msg=str(request_id))
        from_earlier_days += day == DAYS[-1] and len(past) > 0 and past[0, 7] < last_day_start
    assert from_earlier_days > 0  # histories carry over from one day to the next


def test_recent_views_reveal_the_current_intent(twin: Twin) -> None:
    """The ground truth shares categories with the last views far more than with the oldest ones."""
    recent, oldest = [], []
    positives = twin.all_stage[twin.all_stage["rank_pos"] == 1]
    for (day, request_id), group in positives.groupby(["day", "request_id"]):
        history = twin.seq_dicts[day][request_id]
        history = history[history[:, 7] > 0]
        if len(history) >= 30:
            recent.append(np.isin(group["category_level_two"], history[-5:, 2]).mean())
            oldest.append(np.isin(group["category_level_two"], history[:5, 2]).mean())
    assert len(recent) > 50
    assert np.mean(recent) > np.mean(oldest) + 0.15


def test_same_seed_same_bytes_whatever_the_chunk_size(twin: Twin, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synth, "_CHUNK", 37)
    synth.generate(CONFIG, tmp_path, progress=False)
    assert _files(tmp_path) == _files(twin.root)


def test_other_seed_other_data(twin: Twin, tmp_path: Path) -> None:
    synth.generate(synth.SynthConfig.preset("tiny", seed=1, days=1), tmp_path, progress=False)
    day = DAYS[-1]
    other = pd.read_feather(tmp_path / schema.ALL_STAGE_DIR / f"{day}.feather")
    mine = twin.all_stage[twin.all_stage["day"] == day].drop(columns="day").reset_index(drop=True)
    assert not other["video_id"].equals(mine["video_id"])
    assert not other["request_timestamp"].equals(mine["request_timestamp"])


def test_calibration_report(twin: Twin) -> None:
    recall = twin.report.joint_recall
    assert abs(recall["2-stage"]["random"] - 0.5) < 0.1 and abs(recall["3-stage"]["random"] - 0.4) < 0.1
    assert recall["2-stage"]["noise_free"] > 0.85 and recall["3-stage"]["noise_free"] > 0.85
    written = json.loads((twin.root / synth.REPORT_PATH).read_text())
    assert written["joint_recall"] == recall
    assert written["config"]["seed"] == CONFIG.seed and written["config"]["end_day"] == DAYS[-1]
    assert written["days"] == DAYS and written["requests"] == CONFIG.days * CONFIG.requests_per_day
    summary = twin.report.summary()
    assert "requests/s" in summary and f"{recall['3-stage']['noise_free']:.3f}" in summary


def test_presets_and_overrides() -> None:
    small = synth.SynthConfig.preset("small", days=2, end_day="2024-01-20")
    assert small.days == 2 and small.requests_per_day == synth.PRESETS["small"]["requests_per_day"]
    assert small.day_list == [dt.date(2024, 1, 19), dt.date(2024, 1, 20)]
    with pytest.raises(ValueError, match="unknown synth preset"):
        synth.SynthConfig.preset("huge")


@pytest.mark.parametrize("overrides, field", [
    (dict(days=0), "days"),
    (dict(num_users=0), "num_users"),
    (dict(pool_size=220), "pool_size"),
    (dict(prerank_keep=100), "prerank_keep"),
    (dict(coarse_keep=25), "coarse_keep"),
    (dict(num_videos=1_000), "num_videos"),
    (dict(intent_stickiness=1.5), "intent_stickiness"),
    (dict(zipf_exponent=0.0), "zipf_exponent"),
    (dict(stage_noise=(1.0, 1.0, 1.0)), "stage_noise"),
    (dict(end_day="2024-02-30"), "invalid day"),
    (dict(pickle_protocol=1), "pickle_protocol"),
    (dict(vocab="full"), "vocab"),
    (dict(vocab="recflow", num_devices=50_000), "num_devices"),
])
def test_config_validation(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        synth.SynthConfig(**overrides)


@pytest.mark.parametrize("protocol", [2, 4])
def test_shuffled_rows_and_pickle_protocol_change_the_layout_not_the_data(twin: Twin, tmp_path: Path,
                                                                           protocol: int) -> None:
    root = tmp_path / "raw"
    code = cli.main(["--quiet", "synth", "--out", str(root), "--preset", "tiny", "--shuffle-rows",
                     "--pickle-protocol", str(protocol)])
    assert code == 0
    config = json.loads((root / synth.REPORT_PATH).read_text())["config"]
    assert config["shuffle_rows"] is True and config["pickle_protocol"] == protocol
    key = ["request_id", "video_id"]
    for day in DAYS:
        frame = pd.read_feather(root / schema.ALL_STAGE_DIR / f"{day}.feather")
        ids = frame["request_id"].to_numpy()
        assert np.count_nonzero(np.diff(ids)) > 10 * len(np.unique(ids)), "rows are not grouped by request"
        mine = twin.all_stage[twin.all_stage["day"] == day].drop(columns="day")
        pd.testing.assert_frame_equal(frame.sort_values(key, ignore_index=True), mine.sort_values(key, ignore_index=True))
        realshow = pd.read_feather(root / schema.REALSHOW_DIR / f"{day}.feather")
        pd.testing.assert_frame_equal(realshow, frame[frame["realshow"] == 1].reset_index(drop=True))
        for folder, expected in ((schema.REQUEST_DICT_DIR, twin.request_dicts[day]), (schema.SEQ_DICT_DIR, twin.seq_dicts[day])):
            path = root / folder / f"{day}.pkl"
            assert path.read_bytes()[:2] == bytes([0x80, protocol])  # the PROTO opcode and its argument
            assert _equal_nested(_load_pickle(path), expected), path
    assert (root / schema.ID_CNT_PATH).read_bytes()[1] == protocol
    assert _load_pickle(root / schema.ID_CNT_PATH) == twin.id_cnt
    again = tmp_path / "again"
    synth.generate(synth.SynthConfig.preset("tiny", shuffle_rows=True, pickle_protocol=protocol), again, progress=False)
    assert _files(again) == _files(root), "the shuffle is seeded"


def _equal_nested(a, b) -> bool:
    """Equality of dicts of (dicts of) arrays, with the same key order."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_equal_nested(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and np.array_equal(a, b)


def test_recflow_vocab_relabels_the_same_twin_over_the_full_ranges(twin: Twin, tmp_path: Path) -> None:
    """--vocab recflow: the same logs as the twin's (same seed), each user, device, video and author id
    replaced by one id of RecFlow's full range (one to one, so popularity keeps its skew), ids spread
    over the whole range, id_cnt.pkl with RecFlow's counts; the converter takes it."""
    from lcron_dist.data import convert, dataset

    root = tmp_path / "raw"
    assert cli.main(["--quiet", "synth", "--out", str(root), "--preset", "tiny", "--vocab", "recflow"]) == 0
    counts = _load_pickle(root / schema.ID_CNT_PATH)
    full = {**schema.RECFLOW_ID_COUNTS, "device_id": schema.RECFLOW_NUM_DEVICES}
    assert {field: counts[field] for field in schema.ID_FIELDS} == full
    frame = pd.concat([pd.read_feather(root / schema.ALL_STAGE_DIR / f"{day}.feather") for day in DAYS],
                      ignore_index=True)
    relabelled = ["user_id", "device_id", "video_id", "author_id"]
    mine = twin.all_stage.drop(columns="day")
    pd.testing.assert_frame_equal(frame.drop(columns=relabelled), mine.drop(columns=relabelled))
    for field in relabelled:
        pairs = pd.DataFrame({"twin": mine[field], "full": frame[field]}).drop_duplicates()
        assert pairs["twin"].is_unique and pairs["full"].is_unique, f"{field} is not relabelled one to one"
        ids = pairs["full"]
        assert ids.between(0, full[field] - 1).all(), field
        assert ids.min() < 0.1 * full[field] and ids.max() > 0.9 * full[field], f"{field} ids do not span the range"

    data = tmp_path / "dataset"
    convert.convert(root, data, num_stages=2, progress=False)
    assert dataset.load_meta(data).vocab_sizes == dataset.vocab_sizes(full)
