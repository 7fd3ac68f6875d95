"""`lcron-score --export EXPORT --data DATASET --day DAY`: the exported cascade over a day, as a server runs it.

Two passes over the day's requests, both through the exported artifacts only (runtime.ExportedCascade):
- metrics: every stage scores every candidate, and lcron_dist.metrics.CascadeMetrics applies the quotas
  (30 -> 20 or 40 -> 30 -> 20) and computes joint recall, per-stage Recall@10@m and NDCG@10 in the
  layout of the trainer's evaluation of the source run (its eval batch per rank, its world size, one
  seeded tie-break generator per rank), so an fp32 export reports the trainer's numbers;
- serving: the funnel, each stage scoring only what the previous one kept, timed per request at batch 1
  (p50, p99) and in requests/s at batch 64; its own joint recall (torch.topk, no random tie-break) is
  reported beside.
With --reference FP32_EXPORT (for an int8 export), the same day is scored with the reference too and the
report adds the metric differences and the size reduction.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lcron_dist.data import dataset, schema
from lcron_dist.data.batch import Batch
from lcron_dist.data.errors import DataError
from lcron_dist.data.reader import DayArrays, LocalReader, make_batch, plan_batches
from lcron_dist.metrics import CascadeMetrics, metrics_summary
from lcron_dist.serving.catalogue import check_dataset
from lcron_dist.serving.runtime import MANIFEST, ExportedCascade, read_export_manifest

SERVING_BATCH = 64
LATENCY_REQUESTS = 200
WARMUP_REQUESTS = 10


def serving_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Batch's feature-major ids as the programs' batch-major user [B, U], item [B, N, F], history [B, L, H]."""
    return (batch.user.T.contiguous(), batch.item.permute(1, 2, 0).contiguous(),
            batch.history.permute(1, 2, 0).contiguous())


def load_scored_day(export: Path, root: Path, day: dt.date) -> tuple[dataset.DatasetMeta, DayArrays]:
    """The day's requests in log order, once the dataset is checked against the export's manifest (before
    any program is loaded, so a dataset that does not fit fails at once)."""
    manifest = read_export_manifest(export)
    meta = dataset.load_meta(root)
    check_dataset(root, meta, manifest["vocab_sizes"], len(manifest["stages"]), f"export {Path(export) / MANIFEST}")
    if schema.day_name(day) not in meta.days:
        raise DataError(f"day {day} is not in the dataset (it has {', '.join(meta.days)})",
                        file=root / schema.META_FILE, day=day)
    # The trainer's reading path: a copy of the day in log order.
    return meta, LocalReader(root, batch_size=1).load_rows(day, np.arange(meta.days[schema.day_name(day)]))


def score_day(cascade: ExportedCascade, arrays: DayArrays, meta: dataset.DatasetMeta,
              batch_size: int = SERVING_BATCH) -> list[torch.Tensor]:
    """Every stage's [R, N] scores of every candidate of the day's R requests (log order)."""
    parts = []
    for start in range(0, len(arrays["request_id"]), batch_size):
        batch = make_batch(arrays, slice(start, start + batch_size), meta.group_size)
        parts.append(cascade.score_all(*serving_inputs(batch)))
    return [torch.cat(stage) for stage in zip(*parts)]


def evaluate(stages: list[str], scores: list[torch.Tensor], arrays: DayArrays, meta: dataset.DatasetMeta,
             day: dt.date, layout: dict) -> dict[str, float]:
    """CascadeMetrics of `scores` in the trainer's evaluation layout (layout: seed, batch_size, world_size).

    Each rank of the source run evaluated its share of every global batch with its own generator seeded
    alike; the sums of those ranks are what the trainer all-reduced.
    """
    seed, batch_size, world_size = layout["seed"], layout["batch_size"], layout["world_size"]
    total = None
    for rank in range(world_size):
        metrics = CascadeMetrics(tuple(stages), torch.device("cpu"), seed=seed)
        for rows in plan_batches(len(arrays["request_id"]), batch_size, rank, world_size, False, seed, day):
            batch = make_batch(arrays, rows, meta.group_size)
            index = torch.from_numpy(rows)
            metrics.update([s[index] for s in scores], batch.label, batch.mask, batch.target)
        if total is None:
            total = metrics
        else:
            total.sums += metrics.sums
    return total.compute()


def served_recall(kept: torch.Tensor, batch: Batch) -> torch.Tensor:
    """[B] recall of the ground truth among the funnel's kept positions (padded candidates never count)."""
    hits = (batch.target & batch.mask).gather(1, kept).sum(1).float()
    return hits / (batch.target & batch.mask).sum(1).clamp(min=1).float()


def serve_day(cascade: ExportedCascade, arrays: DayArrays, meta: dataset.DatasetMeta,
              batch_size: int = SERVING_BATCH) -> dict[str, float]:
    """The funnel over the day in batches of `batch_size`: requests/s (scoring only) and its joint recall."""
    batches = [make_batch(arrays, slice(s, s + batch_size), meta.group_size)
               for s in range(0, len(arrays["request_id"]), batch_size)]
    inputs = [serving_inputs(b) for b in batches]
    cascade.serve(*inputs[0], batches[0].mask)  # warm-up
    recalls, seconds = [], 0.0
    for batch, (user, item, history) in zip(batches, inputs):
        start = time.perf_counter()
        kept = cascade.serve(user, item, history, batch.mask)
        seconds += time.perf_counter() - start
        recalls.append(served_recall(kept, batch))
    requests = sum(b.size for b in batches)
    return {"batch": batch_size, "requests_per_s": requests / max(seconds, 1e-9),
            "joint_recall": torch.cat(recalls).double().mean().item()}


def latency(cascade: ExportedCascade, arrays: DayArrays, meta: dataset.DatasetMeta,
            requests: int = LATENCY_REQUESTS, warmup: int = WARMUP_REQUESTS) -> dict[str, float]:
    """Milliseconds per request through the funnel at batch 1, over the day's first `requests` requests."""
    count = min(requests, len(arrays["request_id"]))
    batches = [make_batch(arrays, slice(i, i + 1), meta.group_size) for i in range(count)]
    times = []
    for i, batch in enumerate([*batches[:warmup], *batches]):
        inputs = serving_inputs(batch)
        start = time.perf_counter()
        cascade.serve(*inputs, batch.mask)
        if i >= min(warmup, count):
            times.append((time.perf_counter() - start) * 1e3)
    return {"batch": 1, "requests": len(times), "p50_ms": float(np.percentile(times, 50)),
            "p99_ms": float(np.percentile(times, 99))}


def export_bytes(cascade: ExportedCascade) -> int:
    """Bytes of the export's files (programs, item index, manifest)."""
    return sum(cascade.manifest["files"].values())


def score(export: Path, data: Path, day: dt.date, batch_size: int = SERVING_BATCH,
          latency_requests: int = LATENCY_REQUESTS, reference: Path | None = None) -> dict:
    """The report of lcron-score (see the module docstring)."""
    meta, arrays = load_scored_day(export, Path(data), day)
    cascade = ExportedCascade(export)
    layout = cascade.manifest["evaluation"]
    scores = score_day(cascade, arrays, meta, batch_size)
    metrics = evaluate(cascade.stages, scores, arrays, meta, day, layout)
    video = torch.from_numpy(arrays["cand_video_id"][arrays["cand_mask"] != 0].astype(np.int64))
    report = {
        "export": str(export), "dtype": cascade.manifest["dtype"], "day": str(day), "requests": metrics["requests"],
        **metrics_summary(metrics, cascade.stages),
        "evaluation_layout": layout,
        "not_indexed_candidates": int((~cascade.is_indexed(video)).sum()),
        "serving": {"latency": latency(cascade, arrays, meta, latency_requests),
                    "throughput": serve_day(cascade, arrays, meta, SERVING_BATCH),
                    "torch_threads": torch.get_num_threads()},
        "bytes": {"export": export_bytes(cascade), **cascade.manifest["table_bytes"]},
    }
    tables = cascade.manifest["table_bytes"]
    report["bytes"]["table_reduction"] = 1 - tables["exported"] / tables["fp32"]
    if reference is not None:
        ref = ExportedCascade(reference)
        if ref.manifest["source"]["checkpoint"] != cascade.manifest["source"]["checkpoint"]:
            raise ValueError(f"--reference {reference} was exported from {ref.manifest['source']['checkpoint']}, "
                             f"{export} from {cascade.manifest['source']['checkpoint']}")
        ref_scores = score_day(ref, arrays, meta, batch_size)
        ref_metrics = evaluate(ref.stages, ref_scores, arrays, meta, day, layout)
        mask = torch.from_numpy(arrays["cand_mask"] != 0)
        report["reference"] = {
            "export": str(reference), "dtype": ref.manifest["dtype"], **metrics_summary(ref_metrics, ref.stages),
            "joint_recall_difference": metrics["joint_recall"] - ref_metrics["joint_recall"],
            "max_abs_score_difference": {stage: (a - b)[mask].abs().max().item()
                                         for stage, a, b in zip(cascade.stages, scores, ref_scores)},
            "export_bytes": export_bytes(ref),
            "export_reduction": 1 - export_bytes(cascade) / export_bytes(ref),
        }
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcron-score", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", required=True, type=Path, help="an export folder (lcron-export --out)")
    parser.add_argument("--data", required=True, type=Path, help="a converted dataset (holding meta.json)")
    parser.add_argument("--day", required=True, help="the day to score, YYYY-MM-DD")
    parser.add_argument("--batch-size", type=int, default=SERVING_BATCH, help="requests per call of the metrics pass")
    parser.add_argument("--latency-requests", type=int, default=LATENCY_REQUESTS,
                        help="requests timed one by one (batch 1)")
    parser.add_argument("--reference", type=Path, help="an fp32 export of the same checkpoint to compare with")
    parser.add_argument("--out", type=Path, help="also write the report (JSON) here")
    args = parser.parse_args(argv)
    try:
        report = score(args.export, args.data, schema.parse_day(args.day), args.batch_size, args.latency_requests,
                       args.reference)
    except ValueError as exc:  # bad input (export, dataset, day): a message, not a traceback
        print(f"lcron-score: error: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
