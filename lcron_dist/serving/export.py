"""`lcron-export --checkpoint CKPT --out EXPORT [--dtype fp32|int8]`: a trained cascade as serving artifacts.

Reads a complete checkpoint (any world size and sharding), writes the retrieval item index
(item_embeddings.parquet), one torch.export program per model side (retrieval_user, prerank, ranking)
and manifest.json. The folder is written as EXPORT.tmp-<pid> and renamed when complete.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from lcron_dist.components.checkpoint import library_versions
from lcron_dist.data import dataset, schema
from lcron_dist.models import Cascade
from lcron_dist.serving.catalogue import (
    Catalogue,
    check_dataset,
    collect_catalogue,
    item_vectors,
    write_item_embeddings,
)
from lcron_dist.serving.programs import ItemTower, build_serving_modules, export_program, quantize_tables
from lcron_dist.serving.restore import restore_cascade, table_vocab_sizes
from lcron_dist.serving.runtime import MANIFEST

FORMAT_VERSION = 1
ITEM_EMBEDDINGS = "item_embeddings.parquet"
DTYPES = ("fp32", "int8")


def table_bytes(model: Cascade) -> int:
    """Bytes of the embedding tables as they are now (fp32 rows, or int8 rows with their scale and bias).

    Counted by storage, so a view of a table (TorchRec keeps some) is not counted twice; fbgemm's int8
    lookup modules hold their rows as plain tensor attributes, not buffers.
    """
    tensors = [t for stage in model.sparse.values() for collection in stage.collections() for m in collection.modules()
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False), *vars(m).values()] if torch.is_tensor(t)]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def write_artifacts(model: Cascade, root: Path, meta: dataset.DatasetMeta, days: list[dt.date],
                    folder: Path) -> tuple[dict[str, str], Catalogue]:
    """The programs (file by name) and the item index of `model` into `folder`; returns them."""
    programs = {}
    for name, module in build_serving_modules(model).items():
        programs[name] = f"{name}.pt2"
        torch.export.save(export_program(name, module, meta.seq_len), folder / programs[name])
    catalogue = collect_catalogue(root, days)
    tower = ItemTower(model.sparse["retrieval"], model.dense.towers["retrieval"])
    write_item_embeddings(folder / ITEM_EMBEDDINGS, catalogue.item, item_vectors(tower, catalogue.item))
    return programs, catalogue


def export(checkpoint: Path, out: Path, dtype: str = "fp32", data: Path | None = None,
           days: str | None = None, force: bool = False) -> dict:
    """Write the export of `checkpoint` to `out`; returns its manifest.

    Args:
        data: the dataset whose videos form the catalogue (default: the checkpoint's data.path).
        days: the catalogue's days (FIRST:LAST or a list; default: every day of the dataset).
        force: replace an existing `out`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and not force:
        raise ValueError(f"{out} exists: choose another --out or pass --force to replace it")
    start = time.perf_counter()
    model, checkpoint, source = restore_cascade(checkpoint)
    config = source["config"]
    root = Path(data or config["data"]["path"])
    meta = dataset.load_meta(root)
    vocab = table_vocab_sizes(source["model"]["tables"])
    check_dataset(root, meta, vocab, len(model.stages), f"checkpoint {checkpoint}")
    catalogue_days = schema.parse_days(days) if days else meta.day_list
    fp32_bytes = table_bytes(model)
    if dtype == "int8":
        quantize_tables(model.sparse)

    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        programs, catalogue = write_artifacts(model, root, meta, catalogue_days, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # complete or absent
        raise

    manifest = {
        "format": FORMAT_VERSION,
        "stages": list(model.stages),
        "quotas": list(schema.SERVING_QUOTAS[len(model.stages)]),
        "num_candidates": meta.num_candidates,
        "seq_len": meta.seq_len,
        "inputs": {"user": list(schema.USER_FEATURES), "item": list(schema.ITEM_FEATURES),
                   "history": list(schema.HISTORY_FEATURES)},
        "programs": programs,
        "item_embeddings": ITEM_EMBEDDINGS,
        "catalogue": {"dataset": str(root.resolve()), "days": [str(d) for d in catalogue_days],
                      "videos": len(catalogue.item), "inconsistent_videos": catalogue.inconsistent},
        "vocab_sizes": vocab,
        "dtype": dtype,
        "table_bytes": {"fp32": fp32_bytes, "exported": table_bytes(model)},
        "evaluation": {"seed": config["train"]["seed"], "batch_size": config["data"]["eval_batch_size"],
                       "world_size": source["world_size"]},
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "step": source["step"],
                   "world_size": source["world_size"], "sharding": source["plan"]["sharding"],
                   "loss": config["loss"]["name"], "versions": source["versions"]},
        "versions": library_versions(),
        "exported_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "export_seconds": round(time.perf_counter() - start, 2),
    }
    manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lcron-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path,
                        help="a checkpoint (RUN/checkpoints/step-N), or RUN/checkpoints (its newest complete one)")
    parser.add_argument("--out", required=True, type=Path, help="the export folder to write")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES, help="embedding tables: fp32, or int8 rows")
    parser.add_argument("--data", type=Path, help="dataset of the catalogue (default: the checkpoint's data.path)")
    parser.add_argument("--days", help="catalogue days, FIRST:LAST or a list (default: every day of --data)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    try:
        manifest = export(args.checkpoint, args.out, args.dtype, args.data, args.days, args.force)
    except ValueError as exc:  # bad input (checkpoint, dataset, arguments): a message, not a traceback
        print(f"lcron-export: error: {exc}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{name} {size / 2**20:.2f} MiB" for name, size in manifest["files"].items())
    print(f"exported {manifest['source']['checkpoint']} ({manifest['dtype']}) to {args.out} in "
          f"{manifest['export_seconds']:.1f} s: {sizes}; {manifest['catalogue']['videos']} videos indexed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
