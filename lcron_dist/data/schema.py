"""The RecFlow raw layout and the converted Parquet layout, as constants.

Everything that names a file, a column, a stage label or a group lives here, so the converter, the
validator, the synthetic twin and the batch reader agree by construction (see docs in RECFLOW.md).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------------
# Raw layout (as published)
# ---------------------------------------------------------------------------------------------------

TIME_ZONE = "Asia/Shanghai"
"""Fixed zone of every time feature; RecFlow's requests were logged in China."""

ALL_STAGE_DIR = "all_stage"
REALSHOW_DIR = "realshow"
REQUEST_DICT_DIR = "request_id_dict"
SEQ_DICT_DIR = "seq_effective_50_dict"
ID_CNT_PATH = "others/id_cnt.pkl"

ALL_STAGE_COLUMNS: tuple[str, ...] = (
    "request_id", "request_timestamp", "user_id", "device_id", "age", "gender", "province",
    "video_id", "author_id", "category_level_one", "category_level_two", "upload_type",
    "upload_timestamp", "duration", "realshow", "rerank_pos", "rerank_neg", "rank_pos", "rank_neg",
    "coarse_neg", "prerank_neg", "rank_index", "rerank_index", "playing_time", "effective_view",
    "long_view", "like", "follow", "forward", "comment",
)
"""Columns of all_stage/DAY.feather and realshow/DAY.feather; every one is int64."""

REQUEST_COLUMNS: tuple[str, ...] = (
    "request_timestamp", "user_id", "device_id", "age", "gender", "province",
)
"""all_stage columns that are constant within a request."""

STAGE_LABELS: tuple[str, ...] = (
    "realshow", "rerank_pos", "rerank_neg", "rank_pos", "rank_neg", "coarse_neg", "prerank_neg",
)
"""Keys of each request's entry in request_id_dict, and 0/1 flag columns of all_stage."""

LOGGED_PER_REQUEST: dict[str, tuple[int, int]] = {
    "realshow": (1, 6),
    "rerank_pos": (10, 10),
    "rerank_neg": (10, 10),
    "rank_pos": (10, 10),
    "rank_neg": (10, 10),
    "coarse_neg": (40, 40),
    "prerank_neg": (40, 40),
}
"""How many items RecFlow logs per request and stage label: (min, max)."""

DISJOINT_LABELS: tuple[str, ...] = ("rerank_pos", "rerank_neg", "rank_neg", "coarse_neg", "prerank_neg")
"""Stage labels whose item sets never overlap within a request."""

REQUEST_ARRAY_COLUMNS: tuple[str, ...] = (
    "video_id", "author_id", "duration", "category_level_two", "upload_type", "upload_timestamp",
    "category_level_one", "effective_view",
)
"""Columns of the int64 [n, 8] arrays in request_id_dict."""

SEQ_COLUMNS: tuple[str, ...] = (
    "video_id", "author_id", "category_level_two", "category_level_one", "upload_type",
    "upload_timestamp", "duration", "request_timestamp", "playing_time", "request_id",
)
"""Columns of the int64 [50, 10] arrays in seq_effective_50_dict (left-padded with zero rows)."""

SEQ_LEN = 50
"""History length; a history row is valid iff its request_timestamp column is > 0."""

ID_FIELDS: tuple[str, ...] = (
    "user_id", "device_id", "age", "gender", "province", "video_id", "author_id",
    "category_level_one", "category_level_two", "upload_type",
)
"""Id fields whose vocabulary sizes id_cnt.pkl holds; raw ids lie in [0, count)."""

ID_CNT_ALIASES: dict[str, str] = {"photo_id": "video_id", " category_level_two": "category_level_two"}
"""Odd spellings the published id_cnt.pkl uses, mapped to our field names."""

RECFLOW_FIRST_DAY = dt.date(2024, 1, 13)
RECFLOW_LAST_DAY = dt.date(2024, 2, 18)
PERIOD1_LAST_DAY = dt.date(2024, 2, 4)

RECFLOW_ID_COUNTS: dict[str, int] = {
    "user_id": 42_472,
    "video_id": 82_216_301,
    "author_id": 33_474_011,
    "category_level_one": 140,
    "category_level_two": 784,
    "upload_type": 40,
    "age": 8,
    "gender": 3,
    "province": 79,
}
"""Vocabulary sizes of the full published dataset (device_id is not in id_cnt.pkl)."""

RECFLOW_NUM_DEVICES = 42_561
"""Distinct device_id values of the published logs (id_cnt.pkl does not list them)."""

# ---------------------------------------------------------------------------------------------------
# Training examples: candidate groups and graded labels (METHOD.md section 1)
# ---------------------------------------------------------------------------------------------------

GROUP_SIZE = 10
"""Candidates taken per group: the first rows of each request_id_dict list."""

GROUPS: dict[int, tuple[str, ...]] = {
    2: ("rank_pos", "rank_neg", "coarse_neg", "prerank_neg"),
    3: ("rerank_pos", "rerank_neg", "rank_neg", "coarse_neg", "prerank_neg"),
}
"""Candidate groups per stage setting, in candidate order; the first group is the ground truth."""

STAGE_NAMES: dict[int, tuple[str, ...]] = {2: ("retrieval", "ranking"), 3: ("retrieval", "prerank", "ranking")}
"""Stage (model) names of each cascade setting, in cascade order."""

SERVING_QUOTAS: dict[int, tuple[int, ...]] = {2: (30, 20), 3: (40, 30, 20)}
"""Items each stage keeps when serving, in cascade order; also each stage's m in Recall@10@m."""

TOP_K = 10
"""K of the golden metric: |ground truth| = one full group."""

POSITIVE_INDEX_COLUMN: dict[str, str] = {"rank_pos": "rank_index", "rerank_pos": "rerank_index"}
"""all_stage column holding the 1-based position of a positive group's items."""

MAX_POSITIVE_INDEX = 20
MAX_LABEL = 30
"""A positive's graded label is MAX_LABEL - its index (1..MAX_POSITIVE_INDEX)."""

NEGATIVE_LABEL: dict[str, int] = {"rerank_neg": 8, "rank_neg": 7, "coarse_neg": 6, "prerank_neg": 5}
"""Graded label of a negative, by the stage where it left the funnel."""

# ---------------------------------------------------------------------------------------------------
# Converted layout: DATASET/day=YYYY-MM-DD/part-NNNNN.parquet + DATASET/meta.json
# ---------------------------------------------------------------------------------------------------

SCHEMA_VERSION = 1
META_FILE = "meta.json"

USER_FEATURES: tuple[str, ...] = (
    "user_id", "device_id", "age", "gender", "province", "req_weekday", "req_hour", "req_minute",
)
"""Per-request id features, one int32 each."""

ITEM_FEATURES: tuple[str, ...] = (
    "video_id", "author_id", "category_level_two", "category_level_one", "upload_type",
    "upload_weekday", "upload_hour", "upload_minute",
)
"""Per-candidate id features, stored as cand_<name>: fixed_size_list<int32, N>."""

HISTORY_FEATURES: tuple[str, ...] = (
    "video_id", "author_id", "category_level_two", "category_level_one", "upload_type",
)
"""Per-history-position id features, stored as hist_<name>: fixed_size_list<int32, 50>. They are the
first item kinds, in the same order: a stage's table of a kind embeds its candidates and its history
positions alike, and the embedded history is the leading columns of the embedded item layout
(models/embeddings.py)."""


def item_slots(num_candidates: int, seq_len: int) -> int:
    """Item embedding slots per request (Batch.features): the candidates, then the history positions."""
    return num_candidates + seq_len

TIME_VOCAB: dict[str, int] = {"weekday": 8, "hour": 25, "minute": 61}
"""Time features are 1-based (0 = padding), so a table needs these many rows."""


@dataclass(frozen=True)
class StageSetting:
    """The candidate layout of one cascade setting (2- or 3-stage)."""

    num_stages: int

    @property
    def groups(self) -> tuple[str, ...]:
        return GROUPS[self.num_stages]

    @property
    def num_candidates(self) -> int:
        return GROUP_SIZE * len(self.groups)


def day_name(day: dt.date) -> str:
    """File stem of a day: YYYY-MM-DD."""
    return day.isoformat()


def parse_day(text: str) -> dt.date:
    """Parse YYYY-MM-DD, with an error that says what was expected."""
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid day {text!r}: expected YYYY-MM-DD") from None


def parse_days(text: str) -> list[dt.date]:
    """Parse 'FIRST:LAST' (inclusive) or a comma-separated list of days, in chronological order."""
    if ":" in text:
        first, _, last = text.partition(":")
        start, end = parse_day(first.strip()), parse_day(last.strip())
        if end < start:
            raise ValueError(f"invalid day range {text!r}: {end} is before {start}")
        return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    days = sorted({parse_day(part.strip()) for part in text.split(",") if part.strip()})
    if not days:
        raise ValueError(f"invalid day list {text!r}: no day given")
    return days
