"""The batch reader: rank partitioning, batch contents against the Parquet rows, KeyedJaggedTensors."""

from __future__ import annotations

import datetime as dt
import threading
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from lcron_dist.data import dataset, schema
from lcron_dist.data.reader import LocalReader, plan_batches

DAY = dt.date(2024, 2, 4)


@pytest.mark.parametrize("num_requests,world_size", [
    (r, w) for r in (1, 7, 64, 65, 129, 1000) for w in (1, 2, 3) if r >= w  # every rank needs a request
])
@pytest.mark.parametrize("shuffle", [False, True])
def test_plan_uses_every_request_once_with_equal_steps(num_requests: int, world_size: int, shuffle: bool) -> None:
    plans = [plan_batches(num_requests, 32, r, world_size, shuffle, 7, DAY) for r in range(world_size)]
    assert len({len(p) for p in plans}) == 1, "every rank takes the same number of steps"
    rows = np.concatenate([b for p in plans for b in p])
    assert np.array_equal(np.sort(rows), np.arange(num_requests))
    assert all(len(b) > 0 for p in plans for b in p), "no rank gets an empty batch"


def test_two_ranks_see_the_global_batches_of_one_rank() -> None:
    one = plan_batches(1000, 64, 0, 1, True, 3, DAY)
    two = [plan_batches(1000, 32, r, 2, True, 3, DAY) for r in range(2)]
    assert len(one) == len(two[0])
    for step, rows in enumerate(one):
        assert np.array_equal(np.sort(rows), np.sort(np.concatenate([two[0][step], two[1][step]])))


def test_shuffle_depends_on_seed_and_day_only() -> None:
    a = np.concatenate(plan_batches(500, 50, 0, 1, True, 1, DAY))
    assert np.array_equal(a, np.concatenate(plan_batches(500, 50, 0, 1, True, 1, DAY)))
    assert not np.array_equal(a, np.concatenate(plan_batches(500, 50, 0, 1, True, 2, DAY)))
    assert not np.array_equal(a, np.concatenate(plan_batches(500, 50, 0, 1, True, 1, DAY - dt.timedelta(1))))
    assert np.array_equal(np.concatenate(plan_batches(500, 50, 0, 1, False, 1, DAY)), np.arange(500))


def test_batches_hold_the_parquet_rows(tiny_dataset: Path) -> None:
    reader = LocalReader(tiny_dataset, batch_size=16, seed=5)
    meta = reader.meta
    day = meta.day_list[-1]
    table = pq.read_table(dataset.day_files(tiny_dataset, day), partitioning=None).to_pandas().set_index("request_id")
    batches = list(reader.iter_day(day, shuffle=True))
    assert len(batches) == reader.num_batches(day)
    b = batches[1]
    n = meta.num_candidates
    assert b.item.shape == (len(schema.ITEM_FEATURES), b.size, n)
    assert b.history.shape == (len(schema.HISTORY_FEATURES), b.size, schema.SEQ_LEN)
    assert b.user.shape == (len(schema.USER_FEATURES), b.size)
    assert b.item.dtype == torch.int64 and b.mask.dtype == torch.bool
    for j, rid in enumerate(b.request_id.tolist()):
        row = table.loc[rid]
        assert b.user[:, j].tolist() == [row[f] for f in schema.USER_FEATURES]
        assert b.item[:, j].tolist() == [list(row[f"cand_{f}"]) for f in schema.ITEM_FEATURES]
        assert b.history[:, j].tolist() == [list(row[f"hist_{f}"]) for f in schema.HISTORY_FEATURES]
        assert b.label[j].tolist() == list(row.cand_label)
        assert b.mask[j].tolist() == [bool(m) for m in row.cand_mask]
        assert b.target[j].tolist() == [bool(m) and i < 10 for i, m in enumerate(row.cand_mask)]
        assert b.hist_len[j] == row.hist_len
    seen = torch.cat([x.request_id for x in batches])
    assert sorted(seen.tolist()) == sorted(table.index.tolist())


def test_ranks_split_evaluation_exactly(tiny_dataset: Path) -> None:
    meta = dataset.load_meta(tiny_dataset)
    day = meta.day_list[-1]
    per_rank = [
        torch.cat([b.request_id for b in LocalReader(tiny_dataset, 24, rank=r, world_size=2).iter_day(day, shuffle=False)])
        for r in range(2)
    ]
    assert not set(per_rank[0].tolist()) & set(per_rank[1].tolist())
    assert len(per_rank[0]) + len(per_rank[1]) == meta.days[day.isoformat()]


def test_unknown_day_is_a_clear_error(tiny_dataset: Path) -> None:
    with pytest.raises(ValueError, match="day 2020-01-01 is not in the dataset"):
        LocalReader(tiny_dataset, 8).num_batches(dt.date(2020, 1, 1))


def test_features_feed_torchrec_collections_with_shared_tables(tiny_dataset: Path) -> None:
    """User features: one bag per request. Item kinds: the batch's B·N candidate slots, then its B·L
    history slots, one table for both; a kind without history has empty history slots."""
    reader = LocalReader(tiny_dataset, batch_size=8)
    meta = reader.meta
    batch = next(reader.iter_day(meta.day_list[0], shuffle=False))
    b, n, s, dim = batch.size, meta.num_candidates, batch.num_slots, 4
    assert s == n + meta.seq_len
    features = batch.features
    assert features.user.stride() == b and features.item.stride() == b * s
    for kjt in features:  # the stated id counts are the lengths' sums per key
        assert kjt.length_per_key() == kjt.lengths().view(len(kjt.keys()), -1).sum(1).tolist()

    def collection(kinds: tuple[str, ...]) -> EmbeddingBagCollection:
        return EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{kind}", embedding_dim=dim, num_embeddings=meta.vocab_sizes[kind],
                               feature_names=[kind], pooling=PoolingType.SUM) for kind in kinds])

    item_kinds = ("video_id", "author_id", "upload_hour")  # two with history, one without
    collections = {"user": collection(("province",)), "item": collection(item_kinds)}
    weights = {name.split(".")[1][2:]: w for ebc in collections.values() for name, w in ebc.named_parameters()}
    pooled = collections["item"](KeyedJaggedTensor.from_lengths_sync(
        item_kinds, torch.cat([features.item[k].values() for k in item_kinds]),
        torch.cat([features.item[k].lengths() for k in item_kinds])))
    for kind in item_kinds:
        candidates, history = pooled[kind][: b * n].view(b, n, dim), pooled[kind][b * n:].view(b, -1, dim)
        assert torch.equal(candidates, weights[kind][batch.item[schema.ITEM_FEATURES.index(kind)]])
        if kind in schema.HISTORY_FEATURES:
            assert torch.equal(history, weights[kind][batch.history[schema.HISTORY_FEATURES.index(kind)]])
        else:
            assert not history.any(), "a kind without history has empty history slots"
    user = KeyedJaggedTensor.from_lengths_sync(["province"], features.user["province"].values(),
                                               features.user["province"].lengths())
    assert torch.equal(collections["user"](user)["province"],
                       weights["province"][batch.user[schema.USER_FEATURES.index("province")]])


def test_resuming_a_day_skips_the_trained_global_batches(tiny_dataset: Path) -> None:
    """iter_day(start=k) gives batches k.. of the day, whether the day was prefetched or not, and
    global_batch_sizes is what the ranks' batches add up to."""
    day = dataset.load_meta(tiny_dataset).day_list[0]
    ranks = [LocalReader(tiny_dataset, batch_size=16, rank=r, world_size=2, seed=4) for r in range(2)]
    full = [[b.request_id.tolist() for b in reader.iter_day(day, shuffle=True)] for reader in ranks]
    assert [len(a) + len(b) for a, b in zip(*full)] == ranks[0].global_batch_sizes(day)
    ranks[1].prefetch(day, shuffle=True)
    for reader, batches in zip(ranks, full):
        assert [b.request_id.tolist() for b in reader.iter_day(day, shuffle=True, start=3)] == batches[3:]


def test_progress_cursor_skips_what_was_trained() -> None:
    from lcron_dist.components.progress import TrainProgress

    days = [dt.date(2024, 2, d) for d in (1, 2, 3)]
    progress = TrainProgress()
    assert [progress.start_batch(d) for d in days] == [0, 0, 0]
    for last in (False, False, True):
        progress.advance(days[0], 64, last)
    progress.advance(days[1], 64, False)
    assert (progress.step, progress.requests, progress.batches) == (4, 256, 1)
    assert [progress.start_batch(d) for d in days] == [None, 1, 0]
    assert TrainProgress.from_dict(progress.to_dict()) == progress


def test_a_reader_holds_one_prefetched_day(tiny_dataset: Path) -> None:
    """Prefetching the pending day again keeps its load; prefetching another drops it (a day nobody
    reads must not stay in memory); every day still reads the same batches."""
    days = dataset.load_meta(tiny_dataset).day_list[:2]
    reader = LocalReader(tiny_dataset, batch_size=16, seed=4)
    expected = {day: [b.request_id.tolist() for b in reader.iter_day(day, shuffle=True)] for day in days}
    reader.prefetch(days[0], shuffle=True)
    load = reader._pending[(days[0], True)]
    reader.prefetch(days[0], shuffle=True)
    assert reader._pending == {(days[0], True): load}
    reader.prefetch(days[1], shuffle=True)
    assert list(reader._pending) == [(days[1], True)]
    for day in reversed(days):  # the second from its prefetch, the first read again
        assert [b.request_id.tolist() for b in reader.iter_day(day, shuffle=True)] == expected[day]
    assert reader._pending == {}


def test_the_next_days_prefetch_keeps_the_day_being_read(tiny_dataset: Path) -> None:
    """The train loop's order: a day's batches are asked for, the next day is prefetched, then the day is
    read. Every day is then loaded once, on the prefetch thread: none dropped and read again."""
    days = dataset.load_meta(tiny_dataset).day_list[:3]
    reader = LocalReader(tiny_dataset, batch_size=16, seed=4)
    expected = {day: [b.request_id.tolist() for b in reader.iter_day(day, shuffle=True)] for day in days}
    loads, load_rows = [], reader.load_rows
    reader.load_rows = lambda day, rows: loads.append((day, threading.current_thread().name)) or load_rows(day, rows)
    reader.prefetch(days[0], shuffle=True)
    for i, day in enumerate(days):
        batches = reader.iter_day(day, shuffle=True)
        if i + 1 < len(days):
            reader.prefetch(days[i + 1], shuffle=True)
        assert [b.request_id.tolist() for b in batches] == expected[day]
    assert [day for day, _ in loads] == days
    assert all(thread.startswith("prefetch") for _, thread in loads), loads
