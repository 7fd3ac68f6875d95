"""The converted dataset on disk: day folders of Parquet parts, their Arrow schema, and meta.json.

    DATASET/meta.json
    DATASET/day=YYYY-MM-DD/part-00000.parquet ...

One row is one request. Per-candidate and per-history-position fields are fixed-size lists, so a
batch maps to [B, N] / [B, 50] tensors with a reshape of the Arrow buffers.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from lcron_dist.data import schema
from lcron_dist.data.errors import DataError

DAY_PREFIX = "day="


def arrow_schema(num_candidates: int) -> pa.Schema:
    """Arrow schema of a converted day with `num_candidates` candidates per request."""
    ids = pa.int32()
    fields = [pa.field("request_id", pa.int64()), pa.field("request_timestamp", pa.int64())]
    fields += [pa.field(name, ids) for name in schema.USER_FEATURES]
    fields += [pa.field(f"cand_{name}", pa.list_(ids, num_candidates)) for name in schema.ITEM_FEATURES]
    fields += [
        pa.field("cand_label", pa.list_(pa.int8(), num_candidates)),
        pa.field("cand_mask", pa.list_(pa.int8(), num_candidates)),
    ]
    fields += [pa.field(f"hist_{name}", pa.list_(ids, schema.SEQ_LEN)) for name in schema.HISTORY_FEATURES]
    fields.append(pa.field("hist_len", ids))
    return pa.schema(fields)


def day_dir(root: Path, day: dt.date) -> Path:
    return Path(root) / f"{DAY_PREFIX}{schema.day_name(day)}"


def list_days(root: Path) -> list[dt.date]:
    """Complete days of a dataset (temporary folders of unfinished writes start with '.')."""
    days = []
    for path in Path(root).glob(f"{DAY_PREFIX}*"):
        try:
            days.append(schema.parse_day(path.name[len(DAY_PREFIX):]))
        except ValueError:
            raise DataError("day folder name is not day=YYYY-MM-DD", file=path) from None
    return sorted(days)


def day_files(root: Path, day: dt.date) -> list[Path]:
    """The Parquet parts of a day, in order."""
    folder = day_dir(root, day)
    files = sorted(folder.glob("part-*.parquet"))
    if not files:
        raise DataError("day folder has no part-*.parquet file", file=folder, day=day)
    return files


def count_requests(root: Path, day: dt.date) -> int:
    """Requests of a day, from the Parquet footers (no data read)."""
    return sum(pq.ParquetFile(path).metadata.num_rows for path in day_files(root, day))


@dataclass
class DatasetMeta:
    """Contents of meta.json: everything a reader needs to know without opening a Parquet file."""

    schema_version: int
    num_stages: int
    groups: list[str]
    group_size: int
    num_candidates: int
    seq_len: int
    time_zone: str
    vocab_sizes: dict[str, int]
    """Rows each embedding table needs per field: raw id count + 1 (0 is padding), time fields 1-based."""
    days: dict[str, int]
    """Day (YYYY-MM-DD) -> number of requests, chronological."""
    source: str = ""

    @property
    def day_list(self) -> list[dt.date]:
        return [schema.parse_day(day) for day in self.days]

    @property
    def setting(self) -> schema.StageSetting:
        return schema.StageSetting(self.num_stages)


def vocab_sizes(id_counts: dict[str, int]) -> dict[str, int]:
    """Table rows per encoded feature: ids shifted by +1 (0 = padding), time features 1-based."""
    sizes = {name: count + 1 for name, count in id_counts.items()}
    for prefix in ("req", "upload"):
        for unit, size in schema.TIME_VOCAB.items():
            sizes[f"{prefix}_{unit}"] = size
    return sizes


def write_meta(root: Path, meta: DatasetMeta) -> None:
    """Write meta.json atomically."""
    path = Path(root) / schema.META_FILE
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(dataclasses.asdict(meta), indent=2) + "\n")
    os.replace(tmp, path)


def how_to_create(root: Path) -> str:
    """The commands that write a converted dataset at `root` (from RecFlow's files, or a synthetic twin).

    The stage count comes from a folder named like `dataset-3stage` (default 2); the twin's size from
    the configs' folders (data/tiny: tiny, else small); raw files go beside the dataset, in `raw/`.
    """
    stages = 3 if root.name.endswith("3stage") else 2
    raw = root.parent / "raw"
    preset = "tiny" if root.parent.name == "tiny" else "small"
    convert = f"lcron-data convert --src {raw} --out {root} --stages {stages}"
    synth = f"lcron-data synth --preset {preset} --out {raw}"
    if (raw / "all_stage").is_dir():
        return f"Create it from the raw files beside it: `{convert}`"
    return (f"Create a synthetic twin there: `{synth} && {convert}` (`make demo` writes data/demo and data/tiny), "
            f"or convert RecFlow's files: `lcron-data convert --src RECFLOW_RAW --out {root} --stages {stages}`")


def _has_type(value: object, hint: object) -> bool:
    """Whether a JSON value matches a DatasetMeta field's type (int, str, list[X], dict[K, V])."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(k, args[0]) and _has_type(v, args[1]) for k, v in value.items())
    return isinstance(value, hint) and not (hint is int and isinstance(value, bool))


def _parse_meta(path: Path) -> DatasetMeta:
    """meta.json as a DatasetMeta, each field present and of its type."""
    try:
        fields = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"not valid JSON (damaged? convert again): {exc}", file=path) from None
    if not isinstance(fields, dict):
        raise DataError(f"expected a JSON object of fields, found {type(fields).__name__}", file=path)
    version = fields.get("schema_version")
    if isinstance(version, int) and version != schema.SCHEMA_VERSION:  # other fields may differ: say why first
        raise DataError(f"schema version {version}, this code reads {schema.SCHEMA_VERSION}: convert again",
                        file=path, column="schema_version")
    hints = typing.get_type_hints(DatasetMeta)
    required = [f.name for f in dataclasses.fields(DatasetMeta) if f.default is dataclasses.MISSING]
    for name in [*required, *fields]:
        if name not in hints:
            raise DataError(f"unknown field (this code reads {', '.join(hints)})", file=path, column=name)
        if name not in fields:
            raise DataError("field is missing", file=path, column=name)
        if not _has_type(fields[name], hints[name]):
            expected = hints[name] if typing.get_origin(hints[name]) else hints[name].__name__
            raise DataError(f"expected {expected}, found {json.dumps(fields[name])[:60]}", file=path, column=name)
    for day in fields["days"]:
        try:
            schema.parse_day(day)
        except ValueError as exc:
            raise DataError(str(exc), file=path, column="days") from None
    return DatasetMeta(**fields)


def load_meta(root: Path) -> DatasetMeta:
    """Read and check meta.json of a converted dataset."""
    path = Path(root) / schema.META_FILE
    if not path.is_file():
        raise DataError(f"meta.json is missing: not a converted dataset. {how_to_create(Path(root))}", file=path)
    meta = _parse_meta(path)
    if meta.num_stages not in schema.GROUPS or list(schema.GROUPS[meta.num_stages]) != meta.groups:
        raise DataError(f"unknown stage setting {meta.num_stages} with groups {meta.groups}", file=path, column="groups")
    return meta
