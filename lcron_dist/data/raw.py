"""Reading RecFlow's raw files exactly as published, with format checks that name what is wrong.

A day is four files (all_stage and realshow feather tables, request_id_dict and seq_effective_50_dict
pickles) plus the dataset-wide others/id_cnt.pkl. This module only loads and type-checks them; the
converter and the validator decide what to do with the content.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import gc
import operator
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather

from lcron_dist.data import schema
from lcron_dist.data.errors import DataError


def day_file(root: Path, folder: str, day: dt.date) -> Path:
    """Path of one day's raw file in `folder` (feather for tables, pickle for dicts)."""
    suffix = ".feather" if folder in (schema.ALL_STAGE_DIR, schema.REALSHOW_DIR) else ".pkl"
    return Path(root) / folder / f"{schema.day_name(day)}{suffix}"


def list_days(root: Path) -> list[dt.date]:
    """Days present in a raw root, in chronological order.

    A day is judged by all_stage/*.feather, and also by the day files of the other folders: a day whose
    all_stage file is lost is then reported as missing by whoever reads it, not skipped without a word.
    """
    folder = Path(root) / schema.ALL_STAGE_DIR
    if not folder.is_dir():
        raise DataError(f"not a RecFlow raw root: folder {schema.ALL_STAGE_DIR}/ is missing", file=root)
    days = set()
    for path in folder.glob("*.feather"):
        try:
            days.add(schema.parse_day(path.stem))
        except ValueError:
            raise DataError("file name is not YYYY-MM-DD.feather", file=path) from None
    if not days:
        raise DataError("no day files (YYYY-MM-DD.feather) found", file=folder)
    for other in (schema.REALSHOW_DIR, schema.REQUEST_DICT_DIR, schema.SEQ_DICT_DIR):
        some_day = day_file(root, other, schema.RECFLOW_FIRST_DAY)
        for path in some_day.parent.glob(f"*{some_day.suffix}"):
            with contextlib.suppress(ValueError):  # only all_stage/ has to hold day files alone
                days.add(schema.parse_day(path.stem))
    return sorted(days)


class _Record(NamedTuple):
    """Where an array's fields sit in a raw record of `size` fields, and the memory order that allows
    joining its bytes."""

    size: int
    data: int
    dtype: int
    shape: int
    order: int
    c_order: Any


_P5_RECORD = _Record(size=4, data=0, dtype=1, shape=2, order=3, c_order="C")
"""Protocol 5: numpy's _frombuffer(data, dtype, shape, order), kept as the tuple of its arguments."""
_P4_RECORD = _Record(size=5, data=4, dtype=2, shape=1, order=3, c_order=False)
"""Protocol <= 4: numpy's array state (version, shape, dtype, is_fortran, data)."""


def _frombuffer(*record: Any) -> tuple:
    """Stands in for numpy's protocol-5 array constructor: keeps (data, dtype, shape, order) as a tuple.

    A RecFlow day pickles hundreds of thousands of small arrays; building an object per array costs
    more than the rest of the conversion. Kept raw, one stage label's arrays of a whole day become
    one numpy array with a single join of their bytes (join_rows).
    """
    return record


class _ArrayState(list):
    """Protocol <= 4 builds an array in two steps: numpy's _reconstruct makes an empty array, then the
    BUILD opcode hands it its state. Both steps stay in C here: _reconstruct makes an empty list of this
    type (a partial of list.__new__, which ignores arguments), and __setstate__ appends the state."""

    __slots__ = ()
    __setstate__ = list.append


_reconstruct = functools.partial(list.__new__, _ArrayState)


def _frombuffer_to_numpy(record: tuple) -> np.ndarray:
    """The array of a protocol-5 record, as numpy's _frombuffer builds it."""
    data, dtype, shape, order = record
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order)


def _state_to_numpy(state: tuple) -> np.ndarray:
    """The array of a protocol <= 4 state, built by numpy's own __setstate__ (any state version, object arrays)."""
    array = np.ndarray((0,), np.int8)
    array.__setstate__(state)
    return array


@contextlib.contextmanager
def gc_paused():
    """Pause Python's cycle collector while a day's files are loaded and used.

    Unpickling a day creates a few hundred thousand containers (dicts, array records) that hold no
    cycles and die with the day; letting the collector re-traverse them costs a quarter of a
    conversion.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _DayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy._core.numeric", "numpy.core.numeric") and name == "_frombuffer":
            return _frombuffer
        if module in ("numpy._core.multiarray", "numpy.core.multiarray") and name == "_reconstruct":
            return _reconstruct
        return super().find_class(module, name)


def join_rows(
    arrays: list, width: int, what: str, path: Path, day: dt.date | None, column: str | None = None,
    head: int | None = None, keys: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack int [n_i, width] arrays (raw records as unpickled by this module, or ndarrays) into one int64 array.

    Args:
        head: keep only the first `head` rows of each array.
        keys: the request id each array belongs to, named when one is not an integer [n, width] array.

    Returns:
        rows: [sum min(n_i, head), width] int64;
        lengths: [len(arrays)] int64, each array's n_i (before `head`).
    """
    kinds = set(map(type, arrays))
    if kinds == {_ArrayState}:
        records, fields = list(map(operator.itemgetter(0), arrays)), _P4_RECORD
    elif kinds == {tuple}:
        records, fields = arrays, _P5_RECORD
    else:
        fields = None
    if fields is not None and set(map(len, records)) == {fields.size}:
        dtypes = set(map(operator.itemgetter(fields.dtype), records))
        shapes = list(map(operator.itemgetter(fields.shape), records))
        good = (len(dtypes) == 1 and all(np.dtype(d).kind in "iu" for d in dtypes)
                and set(map(len, shapes)) == {2} and set(map(operator.itemgetter(1), shapes)) == {width}
                and set(map(operator.itemgetter(fields.order), records)) == {fields.c_order})
        if good:
            dtype = np.dtype(dtypes.pop())
            lengths = np.fromiter(map(operator.itemgetter(0), shapes), dtype=np.int64, count=len(shapes))
            data = map(operator.itemgetter(fields.data), records)
            if head is not None and lengths.max(initial=0) > head:
                # bytes or bytearray: a slice copies only the head (faster to join than memoryviews)
                data = map(operator.itemgetter(slice(head * width * dtype.itemsize)), data)
            flat = np.frombuffer(b"".join(data), dtype=dtype)
            return flat.reshape(-1, width).astype(np.int64, copy=False), lengths
    if kinds & {tuple, _ArrayState}:
        arrays = [_state_to_numpy(a[0]) if type(a) is _ArrayState else
                  _frombuffer_to_numpy(a) if type(a) is tuple else a for a in arrays]
    arrays = list(map(_as_array, arrays))
    bad = next((i for i, a in enumerate(arrays)
                if a is None or a.ndim != 2 or a.shape[1] != width or a.dtype.kind not in "iu"), None)
    if bad is not None:
        found = "a ragged nested list" if arrays[bad] is None else f"{arrays[bad].dtype} {list(arrays[bad].shape)}"
        owner = "" if keys is None else f" (request {keys[bad]})"
        raise DataError(f"{what} must all be integer arrays [n, {width}], got {found}{owner}",
                        file=path, day=day, column=column)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    rows = np.concatenate([a[:head] for a in arrays]) if arrays else np.zeros((0, width), np.int64)
    return rows.astype(np.int64, copy=False), lengths


def _as_array(value: Any) -> np.ndarray | None:
    """`value` as an ndarray; None where numpy cannot make one (a ragged nested list)."""
    try:
        return np.asarray(value)
    except ValueError:
        return None


def _load_pickle(path: Path, day: dt.date | None) -> Any:
    if not path.is_file():
        raise DataError("file is missing", file=path, day=day)
    try:
        with open(path, "rb") as f:
            return _DayUnpickler(f).load()
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"not a readable pickle (truncated or corrupt?): {exc}", file=path, day=day) from None


def load_id_counts(root: Path) -> dict[str, int]:
    """Vocabulary sizes from others/id_cnt.pkl, keyed by our field names (aliases resolved)."""
    path = Path(root) / schema.ID_CNT_PATH
    raw = _load_pickle(path, None)
    if not isinstance(raw, dict):
        raise DataError(f"expected a dict {{field: count}}, got {type(raw).__name__}", file=path)
    counts: dict[str, int] = {}
    for key, value in raw.items():
        name = schema.ID_CNT_ALIASES.get(key, str(key).strip())
        if name in counts and counts[name] != int(value):
            raise DataError(f"aliases disagree: {counts[name]} vs {value} for key {key!r}", file=path, column=name)
        counts[name] = int(value)
    for name in schema.ID_FIELDS:
        if name not in counts:
            raise DataError("field missing from id_cnt.pkl (it must give every id field's count)", file=path, column=name)
        if counts[name] <= 0:
            raise DataError(f"count must be positive, got {counts[name]}", file=path, column=name)
    return {name: counts[name] for name in schema.ID_FIELDS}


def read_table(path: Path, day: dt.date, columns: tuple[str, ...] = schema.ALL_STAGE_COLUMNS) -> pa.Table:
    """Read `columns` of an all_stage/realshow feather file, checking presence and int64 type.

    Only the asked-for columns are read: a real all_stage day holds ~30 M rows.
    """
    if not path.is_file():
        raise DataError("file is missing", file=path, day=day)
    try:
        with pa.memory_map(str(path)) as source:
            file_schema = pa.ipc.open_file(source).schema
        for name in columns:
            if name not in file_schema.names:
                raise DataError("column is missing", file=path, day=day, column=name)
            if file_schema.field(name).type != pa.int64():
                raise DataError(f"expected type int64, found {file_schema.field(name).type}", file=path, day=day, column=name)
        return feather.read_table(path, columns=list(columns), memory_map=True)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"not a readable Arrow IPC (feather) file (truncated or corrupt?): {exc}", file=path, day=day) from None


@dataclass
class RequestDict:
    """One day of request_id_dict, flattened for vectorised use.

    Attributes:
        path: the pickle it came from.
        request_ids: [R] int64 keys in file order.
        entries: per request, {stage_label: int64 array [n, 8]}, in the same order.
    """

    path: Path
    request_ids: np.ndarray
    entries: list[dict[str, np.ndarray]]

    def group(self, label: str, day: dt.date, head: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Concatenate one stage label's arrays over all requests.

        Args:
            head: keep only the first `head` rows of each request's array.

        Returns:
            rows: [sum n, 8] int64, the requests' arrays (or their heads) one after another (file order);
            lengths: [R] int64, rows per request in the file (before `head`).
        """
        try:
            arrays = list(map(operator.itemgetter(label), self.entries))
        except KeyError:
            missing = next(rid for rid, entry in zip(self.request_ids, self.entries) if label not in entry)
            raise DataError(f"request {missing} has no {label!r} list", file=self.path, day=day, column=label) from None
        except (TypeError, IndexError):  # an entry that is a list or an array, not a dict
            i = next(i for i, entry in enumerate(self.entries) if not isinstance(entry, dict))
            raise DataError(f"values must be dicts {{stage_label: array}}, the value of request {self.request_ids[i]} "
                            "is not", file=self.path, day=day, column=label) from None
        return join_rows(arrays, len(schema.REQUEST_ARRAY_COLUMNS), "request_id_dict lists", self.path, day, label, head,
                         self.request_ids)


def load_request_dict(root: Path, day: dt.date) -> RequestDict:
    """Load request_id_dict/DAY.pkl."""
    path = day_file(root, schema.REQUEST_DICT_DIR, day)
    data = _load_pickle(path, day)
    if not isinstance(data, dict):
        raise DataError(f"expected a dict {{request_id: {{stage_label: array}}}}, got {type(data).__name__}", file=path, day=day)
    return RequestDict(path, _request_keys(data, path, day), list(data.values()))


def _request_keys(data: dict, path: Path, day: dt.date) -> np.ndarray:
    """The keys of a day pickle as int64 request ids."""
    try:
        return np.fromiter(data.keys(), dtype=np.int64, count=len(data))
    except (TypeError, ValueError, OverflowError) as exc:
        bad = next((k for k in data if not isinstance(k, (int, np.integer)) or not -2**63 <= k < 2**63), None)
        found = exc if bad is None else repr(bad)
        raise DataError(f"keys must be integer request ids, found {found}", file=path, day=day, column="request_id") from None


def load_histories(root: Path, day: dt.date, request_ids: np.ndarray) -> np.ndarray:
    """Histories of `request_ids` from seq_effective_50_dict/DAY.pkl, as int64 [R, 50, 10]."""
    path = day_file(root, schema.SEQ_DICT_DIR, day)
    data = _load_pickle(path, day)
    if not isinstance(data, dict):
        raise DataError(f"expected a dict {{request_id: array [50, 10]}}, got {type(data).__name__}", file=path, day=day)
    keys = _request_keys(data, path, day)
    missing = np.setdiff1d(request_ids, keys)
    if missing.size:
        raise DataError(
            f"{missing.size} request(s) have no history entry, e.g. request {missing[0]} (every request needs a key)",
            file=path, day=day, column="request_id",
        )
    arrays = list(map(data.__getitem__, request_ids.tolist()))
    rows, lengths = join_rows(arrays, len(schema.SEQ_COLUMNS), "histories", path, day, keys=request_ids)
    if not np.all(lengths == schema.SEQ_LEN):
        bad = np.flatnonzero(lengths != schema.SEQ_LEN)[0]
        raise DataError(f"history of request {request_ids[bad]} has {lengths[bad]} rows, not {schema.SEQ_LEN} "
                        f"(histories are [{schema.SEQ_LEN}, {len(schema.SEQ_COLUMNS)}], left-padded)", file=path, day=day)
    return rows.reshape(len(arrays), schema.SEQ_LEN, len(schema.SEQ_COLUMNS))

