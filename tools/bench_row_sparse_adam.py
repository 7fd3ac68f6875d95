"""The CPU table kernels on one stage's item collection: forward + backward + optimizer step, per batch.

The module is a stage's item tables (video, author, categories, upload type and time, dim 8) looked up
for B requests x (N candidates + L history positions) slots, ids drawn with a popularity skew. Each
kernel runs the same batches, in alternating order, `--rounds` times:

- row-sparse Adam: distributed/row_sparse_adam.py (sharded tables' Adam on CPU);
- fbgemm's fused row-wise Adagrad: fbgemm's own C++ CPU kernel of a row-sparse update (the reference
  for what a fused CPU backward costs);
- dense + torch Adam: fbgemm's DENSE kernel (a whole-table gradient) and torch's fused Adam over every
  row: what data-parallel tables run.

`--video-rows` repeats it with the video and author tables at each size (author = video / 3), so the
table shows how each kernel's time grows with the vocabulary.

    python tools/bench_row_sparse_adam.py --video-rows 100000 10000000 30000000 [--batch 1024] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    DenseTableBatchedEmbeddingBagsCodegen,
    SplitTableBatchedEmbeddingBagsCodegen,
)

from lcron_dist.data import schema
from lcron_dist.distributed.optimizers import fused_if_available
from lcron_dist.distributed.row_sparse_adam import RowSparseAdamEmbeddingBags

SMALL_TABLES = {"category_level_two": 785, "category_level_one": 141, "upload_type": 41, "upload_weekday": 8,
                "upload_hour": 25, "upload_minute": 61}
DIM = 8


def table_rows(video_rows: int) -> list[int]:
    """Rows of the item tables in schema.ITEM_FEATURES order."""
    rows = {"video_id": video_rows, "author_id": max(video_rows // 3, 2), **SMALL_TABLES}
    return [rows[kind] for kind in schema.ITEM_FEATURES]


def batch_of(rows: list[int], batch: int, candidates: int, history: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, offsets) of one batch: a bag per slot and feature; history slots only for history kinds."""
    generator = torch.Generator().manual_seed(seed)
    slots = batch * (candidates + history)
    lengths, values = [], []
    for kind, count in zip(schema.ITEM_FEATURES, rows):
        length = torch.ones(slots, dtype=torch.long)
        if kind not in schema.HISTORY_FEATURES:
            length[batch * candidates:] = 0
        ids = (torch.rand(int(length.sum()), generator=generator) ** 3 * (count - 1)).long() + 1  # skewed
        lengths.append(length)
        values.append(ids)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), torch.cat(lengths).cumsum(0)])
    return torch.cat(values), offsets


def kernels(rows: list[int], lr: float) -> dict:
    """name -> (module, step after backward)."""
    specs = [(count, DIM, EmbeddingLocation.HOST, ComputeDevice.CPU) for count in rows]
    adam = RowSparseAdamEmbeddingBags(embedding_specs=specs, optimizer=EmbOptimType.ADAM, learning_rate=lr)
    adagrad = SplitTableBatchedEmbeddingBagsCodegen(embedding_specs=specs, optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                                                    learning_rate=lr)
    dense = DenseTableBatchedEmbeddingBagsCodegen([(count, DIM) for count in rows], use_cpu=True)
    dense_adam = fused_if_available(torch.optim.Adam, dense.parameters(), lr=lr)

    def dense_step() -> None:
        dense_adam.step()
        dense_adam.zero_grad()

    return {"row-sparse Adam (ours)": (adam, lambda: None), "fbgemm fused row-wise Adagrad": (adagrad, lambda: None),
            "dense + torch Adam": (dense, dense_step)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--video-rows", type=int, nargs="+", default=[100_000, 10_000_000])
    parser.add_argument("--batch", type=int, default=1024, help="requests per batch")
    parser.add_argument("--rounds", type=int, default=5, help="timed batches per kernel, alternating")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    candidates = schema.StageSetting(2).num_candidates
    lines = [f"item collection, batch {args.batch} x ({candidates} + {schema.SEQ_LEN}) slots, dim {DIM}, "
             f"{torch.get_num_threads()} threads; medians of {args.rounds} alternating rounds", "",
             "| video / author rows | kernel | ms per batch (fwd + bwd + step) | vs row-sparse Adam |", "|---|---|---|---|"]
    for video_rows in args.video_rows:
        rows = table_rows(video_rows)
        indices, offsets = batch_of(rows, args.batch, candidates, schema.SEQ_LEN, seed=video_rows)
        modules = kernels(rows, lr=0.01)
        times: dict[str, list[float]] = {name: [] for name in modules}
        order = list(modules)
        for round_ in range(args.rounds + 1):  # the first round warms up
            for name in order if round_ % 2 else order[::-1]:
                module, step = modules[name]
                start = time.perf_counter()
                module(indices, offsets).sum().backward()
                step()
                if round_:
                    times[name].append(time.perf_counter() - start)
        base = statistics.median(times[order[0]])
        for name in order:
            ms = statistics.median(times[name])
            lines.append(f"| {video_rows:,} / {rows[1]:,} | {name} | {ms * 1000:.1f} | {ms / base:.2f}x |")
            print(lines[-1], flush=True)
        del modules
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
