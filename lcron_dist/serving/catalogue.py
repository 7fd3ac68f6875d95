"""The retrieval item index: every catalogue video with its features and the item tower's vector.

The default catalogue is every real candidate video of a dataset's days. A video's item features
(author, categories, upload type and time) are the first ones seen in day order; videos logged with other
features on another request are counted (the index keeps one vector per video, as an ANN index does).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lcron_dist.data import dataset, schema
from lcron_dist.data.errors import DataError
from lcron_dist.data.reader import load_day
from lcron_dist.serving.programs import ItemTower

VIDEO_COLUMN = "video_id"
VECTOR_COLUMN = "embedding"


def check_dataset(root: Path, meta: dataset.DatasetMeta, vocab_sizes: dict[str, int], num_stages: int,
                  source: str) -> None:
    """Refuse dataset `root` for a model of `source` unless its stage setting and every vocabulary match
    (with another vocabulary, an id would name another table row).

    Raises:
        DataError: naming the dataset's meta.json, the field, both values and `source`.
    """
    file = Path(root) / schema.META_FILE
    if meta.num_stages != num_stages:
        raise DataError(f"dataset was converted for {meta.num_stages} stages, {source} is a {num_stages}-stage cascade",
                        file=file, column="num_stages")
    for kind, rows in vocab_sizes.items():
        found = meta.vocab_sizes.get(kind)
        if found != rows:
            raise DataError(f"vocabulary of {kind} has {found} rows, but {source} was trained with {rows}: "
                            f"this dataset's ids do not index that model's tables", file=file, column=kind)


@dataclass
class Catalogue:
    item: np.ndarray
    """[V, F] int64 item features (schema.ITEM_FEATURES; column 0 is the video id), sorted by video id."""
    inconsistent: int
    """Videos seen with more than one feature combination (the first one is kept)."""


def _first_per_video(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each video's first row of `rows` [K, F] (video id in column 0), and the ids of videos whose rows differ."""
    _, first, inverse = np.unique(rows[:, 0], return_index=True, return_inverse=True)
    kept = rows[first]
    differs = (rows != kept[inverse]).any(axis=1)
    return kept, np.unique(rows[differs, 0])


def collect_catalogue(root: Path, days: list[dt.date]) -> Catalogue:
    """Every real candidate video of `days` of dataset `root`, with its item features."""
    meta = dataset.load_meta(root)
    kept = np.zeros((0, len(schema.ITEM_FEATURES)), dtype=np.int64)
    inconsistent = np.zeros(0, dtype=np.int64)
    for day in days:  # a day at a time: memory is bounded by one day, as in conversion
        arrays = load_day(root, day, meta)
        real = arrays["cand_mask"].reshape(-1) != 0
        rows = np.stack([arrays[f"cand_{name}"].reshape(-1)[real] for name in schema.ITEM_FEATURES], axis=1)
        day_kept, day_inconsistent = _first_per_video(rows.astype(np.int64))
        kept, across = _first_per_video(np.concatenate([kept, day_kept]))  # earlier days first: theirs win
        inconsistent = np.union1d(inconsistent, np.union1d(day_inconsistent, across))
    return Catalogue(item=kept, inconsistent=len(inconsistent))


@torch.no_grad()
def item_vectors(tower: ItemTower, item: np.ndarray, per_call: int = 1 << 14, per_request: int = 64) -> np.ndarray:
    """[V, H] float32 item tower vectors of `item` [V, F], computed `per_call` items at a time."""
    out = []
    for start in range(0, len(item), per_call):
        chunk = torch.from_numpy(item[start:start + per_call])
        pad = -len(chunk) % per_request  # whole pseudo-requests of `per_request` candidates
        ids = torch.cat([chunk, chunk.new_zeros((pad, chunk.shape[1]))]).view(-1, per_request, chunk.shape[1])
        out.append(tower(ids).reshape(-1, tower.dssm.item_tower[-1].out_features)[:len(chunk)])
    return torch.cat(out).numpy() if out else np.zeros((0, tower.dssm.item_tower[-1].out_features), np.float32)


def write_item_embeddings(path: Path, item: np.ndarray, vectors: np.ndarray) -> None:
    """item_embeddings.parquet: the item features (int64, schema.ITEM_FEATURES) and `embedding` list<float32, H>."""
    columns = {name: pa.array(item[:, i]) for i, name in enumerate(schema.ITEM_FEATURES)}
    dim = vectors.shape[1]
    columns[VECTOR_COLUMN] = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).reshape(-1)), dim)
    pq.write_table(pa.table(columns), path, compression="zstd")
