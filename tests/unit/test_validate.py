"""`lcron-data validate`: clean data passes every check; each kind of broken invariant is caught and located."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from lcron_dist.data import cli, dataset, raw, schema
from lcron_dist.data.validate import validate


def test_clean_raw_root_and_dataset_pass(tiny_raw: Path, tiny_dataset: Path, capsys: pytest.CaptureFixture) -> None:
    raw_report = validate(tiny_raw, progress=False)
    assert raw_report.ok, raw_report.summary()
    assert "realshow ⊂ rerank_pos" in raw_report.passed
    assert raw_report.passed["request_id_dict lists = all_stage flags"] == len(schema.STAGE_LABELS) * len(raw.list_days(tiny_raw))
    ds_report = validate(tiny_dataset, progress=False)
    assert ds_report.ok, ds_report.summary()
    assert cli.main(["--quiet", "validate", str(tiny_dataset)]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "positive labels in 10..29" in out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _edit_table(path: Path, edit) -> None:
    edit(pd.read_feather(path)).reset_index(drop=True).to_feather(path)


RAW_BREAKS = {
    "realshow ⊂ rerank_pos": lambda f: f.assign(realshow=np.where(f.rerank_neg == 1, 1, f.realshow)),
    "rerank_pos, rerank_neg, rank_neg, coarse_neg, prerank_neg disjoint": lambda f: f.assign(rank_neg=np.where(f.coarse_neg == 1, 1, f.rank_neg)),
    "rank_index in 1..20 on rank_pos rows": lambda f: f.assign(rank_index=np.where(f.rank_pos == 1, 21, f.rank_index)),
    "request-level columns constant within a request": lambda f: f.assign(age=np.arange(len(f)) % 2),
    "request_id_dict lists = all_stage flags": lambda f: f.assign(prerank_neg=np.where(f.request_id == f.request_id.iloc[0], 0, f.prerank_neg)),
    "one row per (request, video)": lambda f: pd.concat([f, f.iloc[[len(f) // 2]]]),
}


@pytest.mark.parametrize("check", list(RAW_BREAKS))
def test_broken_raw_invariant_is_reported(check: str, tiny_raw: Path, tmp_path: Path) -> None:
    root = _copy(tiny_raw, tmp_path)
    day = raw.list_days(root)[0]
    _edit_table(raw.day_file(root, schema.ALL_STAGE_DIR, day), RAW_BREAKS[check])
    report = validate(root, progress=False)
    assert not report.ok
    assert check in report.failures, report.summary()
    assert f"day {day}" in report.failures[check][0]


def test_history_from_the_future_is_reported(tiny_raw: Path, tmp_path: Path) -> None:
    root = _copy(tiny_raw, tmp_path)
    day = raw.list_days(root)[-1]
    path = raw.day_file(root, schema.SEQ_DICT_DIR, day)
    with open(path, "rb") as f:
        seqs = pickle.load(f)
    rid = next(iter(seqs))
    seqs[rid][-1, schema.SEQ_COLUMNS.index("request_timestamp")] = 2**62
    with open(path, "wb") as f:
        pickle.dump(seqs, f)
    report = validate(root, progress=False)
    assert f"request {rid} has a history view not before it" in report.failures["histories hold only earlier views"][0]


def test_tampered_dataset_is_reported(tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _copy(tiny_dataset, tmp_path)
    day = dataset.load_meta(root).day_list[0]
    part = dataset.day_files(root, day)[0]
    table = pq.read_table(part, partitioning=None)
    labels = table.column("cand_label").combine_chunks()
    flat = labels.flatten().to_numpy().copy()
    flat[-1] = 9  # last candidate is a prerank_neg: its label must be 5
    table = table.set_column(table.schema.get_field_index("cand_label"), "cand_label",
                             pa.FixedSizeListArray.from_arrays(pa.array(flat), labels.type.list_size))
    table = table.set_column(table.schema.get_field_index("hist_len"), "hist_len", pc.add(table.column("hist_len"), 1))
    pq.write_table(table, part)
    report = validate(root, progress=False)
    assert set(report.failures) == {"negative labels match their group", "hist_len = valid history positions"}
    assert cli.main(["--quiet", "validate", str(root)]) == 1
    assert "FAIL negative labels match their group" in capsys.readouterr().out


@pytest.mark.parametrize("folder", [schema.ALL_STAGE_DIR, schema.REALSHOW_DIR])
def test_lost_feather_file_is_reported_not_skipped(folder: str, tiny_raw: Path, tmp_path: Path) -> None:
    root = _copy(tiny_raw, tmp_path)
    day = raw.list_days(root)[-1]
    path = raw.day_file(root, folder, day)
    path.unlink()
    assert raw.list_days(root)[-1] == day, "the day's other files still list it"
    report = validate(root, progress=False)
    assert report.failures["files readable, columns present and int64"] == [f"file {path}, day {day}: file is missing"]
