"""Spawned ranks that fail instead of hanging: the helper every in-process multi-rank test launches with."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import torch.multiprocessing as mp

TIMEOUT_S = 240.0
"""Seconds a spawned job may take (a tiny-twin job takes 10-60 s on a loaded 2-core machine)."""


def run_ranks(fn: Callable, args: tuple, nprocs: int, timeout_s: float = TIMEOUT_S) -> None:
    """Run fn(rank, *args) in `nprocs` spawned processes and wait for all of them.

    A rank that raises fails the test with its traceback (torch's ProcessRaisedException). Ranks still
    running after `timeout_s` (a deadlocked collective) are killed, every one, and the test fails naming them.
    """
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):  # True once every rank is done
            if time.monotonic() >= deadline:
                alive = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
                pytest.fail(f"rank(s) {alive} of {nprocs} still running after {timeout_s:.0f} s: killed")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
