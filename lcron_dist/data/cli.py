"""`lcron-data`: generate a synthetic RecFlow twin, convert raw RecFlow, validate, summarise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


from lcron_dist.data import schema
from lcron_dist.data.errors import DataError


def _synth(args: argparse.Namespace) -> int:
    from lcron_dist.data import synth

    overrides = {
        name: value
        for name, value in (("days", args.days), ("requests_per_day", args.requests_per_day),
                            ("end_day", args.end_day), ("seed", args.seed),
                            ("shuffle_rows", args.shuffle_rows), ("pickle_protocol", args.pickle_protocol),
                            ("vocab", args.vocab))
        if value is not None
    }
    config = synth.SynthConfig.preset(args.preset, **overrides)
    report = synth.generate(config, args.out, progress=not args.quiet)
    print(report.summary())
    return 0


def _convert(args: argparse.Namespace) -> int:
    from lcron_dist.data import convert

    report = convert.convert(
        args.src, args.out, num_stages=args.stages, days=args.days, workers=args.workers, force=args.force,
        pad_short_groups=args.pad_short_groups, rows_per_file=args.rows_per_file, progress=not args.quiet,
    )
    print(report.summary())
    return 0


def _validate(args: argparse.Namespace) -> int:
    from lcron_dist.data import validate

    report = validate.validate(args.path, progress=not args.quiet)
    print(report.summary())
    return 0 if report.ok else 1


def _summary(args: argparse.Namespace) -> int:
    from lcron_dist.data import dataset, reader

    meta = dataset.load_meta(args.path)
    total = sum(meta.days.values())
    print(f"dataset {args.path}: {meta.num_stages}-stage, {meta.num_candidates} candidates per request "
          f"({', '.join(f'{g}×{meta.group_size}' for g in meta.groups)}), history {meta.seq_len}, zone {meta.time_zone}")
    print(f"  {len(meta.days)} day(s), {total:,} requests: " + ", ".join(f"{d} {n:,}" for d, n in meta.days.items()))
    print("  vocabulary: " + ", ".join(f"{k} {v:,}" for k, v in meta.vocab_sizes.items()))
    last = meta.day_list[-1]
    arrays = reader.load_day(args.path, last, meta)
    mask = arrays["cand_mask"].astype(bool)
    label = arrays["cand_label"].reshape(len(mask), len(meta.groups), meta.group_size)
    real = mask.reshape(label.shape)
    print(f"  last day {last}: mean history length {arrays['hist_len'].mean():.1f} of {meta.seq_len}, "
          f"{mask.mean():.1%} of candidate slots real")
    for g, group in enumerate(meta.groups):
        values = label[:, g][real[:, g]]
        print(f"    {group:<12} label mean {values.mean():5.2f} (min {values.min()}, max {values.max()})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lcron-data", description=__doc__)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write a synthetic twin in RecFlow's raw layout")
    p.add_argument("--out", type=Path, required=True, help="raw root to write")
    p.add_argument("--preset", choices=["tiny", "small", "medium"], default="small", help="sizes (default: small)")
    p.add_argument("--days", type=int, help="number of days (overrides the preset)")
    p.add_argument("--requests-per-day", type=int, help="requests per day (overrides the preset)")
    p.add_argument("--end-day", type=schema.parse_day, help="last day, YYYY-MM-DD (default 2024-02-04)")
    p.add_argument("--seed", type=int, help="random seed (default 0)")
    p.add_argument("--shuffle-rows", action="store_true", default=None,
                   help="write all_stage and realshow rows in a random order, not grouped by request")
    p.add_argument("--pickle-protocol", type=int, choices=(2, 3, 4, 5),  # synth.PICKLE_PROTOCOLS (synth loads torch)
                   help="pickle protocol of the day dicts and id_cnt.pkl (default 5)")
    p.add_argument("--vocab", choices=("twin", "recflow"),  # synth.VOCABS
                   help="id ranges: the preset's own (twin, default) or RecFlow's full vocabularies (82,216,301 "
                        "videos, 33,474,011 authors, ...), the preset's users and videos spread over them")
    p.set_defaults(run=_synth)

    p = sub.add_parser("convert", help="raw RecFlow -> day-partitioned Parquet dataset")
    p.add_argument("--src", type=Path, required=True, help="raw root (all_stage/, request_id_dict/, ...)")
    p.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    p.add_argument("--stages", type=int, choices=sorted(schema.GROUPS), default=2, help="cascade setting (default 2)")
    p.add_argument("--days", type=schema.parse_days, help="FIRST:LAST (inclusive) or a comma list; default: all")
    p.add_argument("--workers", type=int, default=1, help="days converted in parallel (default 1)")
    p.add_argument("--force", action="store_true", help="redo days that are already complete")
    p.add_argument("--pad-short-groups", action="store_true",
                   help="pad groups with fewer than 10 logged items (masked) instead of failing")
    p.add_argument("--rows-per-file", type=int, default=65_536, help="requests per Parquet part")
    p.set_defaults(run=_convert)

    p = sub.add_parser("validate", help="check a raw root or a converted dataset against every invariant")
    p.add_argument("path", type=Path)
    p.set_defaults(run=_validate)

    p = sub.add_parser("summary", help="describe a converted dataset")
    p.add_argument("path", type=Path)
    p.set_defaults(run=_summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (DataError, ValueError) as exc:
        print(f"lcron-data {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
