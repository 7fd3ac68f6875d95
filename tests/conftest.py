"""Shared fixtures: one tiny synthetic RecFlow twin, converted once per session for 2 and 3 stages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny raw twin (read-only for tests: copy it before corrupting)."""
    from lcron_dist.data import synth

    root = tmp_path_factory.mktemp("raw") / "tiny"
    synth.generate(synth.SynthConfig.preset("tiny"), root, progress=False)
    return root


@pytest.fixture(scope="session", params=[2, 3], ids=["2stage", "3stage"])
def tiny_dataset(request: pytest.FixtureRequest, tiny_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny twin converted with --stages 2 and 3."""
    from lcron_dist.data import convert

    out = tmp_path_factory.mktemp("dataset") / f"stages{request.param}"
    convert.convert(tiny_raw, out, num_stages=request.param, progress=False)
    return out
