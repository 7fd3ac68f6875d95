"""Shared fixtures: one tiny synthetic RecFlow twin, converted once per session for 2 and 3 stages; a log of
the ops a piece of code dispatches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch.utils._python_dispatch import TorchDispatchMode

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


class OpLog(TorchDispatchMode):
    """Records the name of every op dispatched under it ("aten::mm", "mkldnn::_linear_pointwise", ...), in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.fixture
def op_log() -> type[OpLog]:
    """OpLog, to use as `with op_log() as log:`."""
    return OpLog
