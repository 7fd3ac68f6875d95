"""The non-finite guard agrees across ranks: a NaN loss on one rank stops both, naming that rank."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch.multiprocessing as mp

from lcron_dist.distributed.process_group import RendezvousStore

TIMEOUT_S = 120


def _rank_main(rank: int, world: int, rendezvous: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", **rendezvous)
    import torch

    from lcron_dist.components.finite import NonFiniteLoss, check_finite_loss
    from lcron_dist.distributed.process_group import init_distributed, teardown

    init_distributed()
    outcomes = []
    for bad_rank, value in ((None, 1.0), (1, float("nan")), (0, float("inf"))):
        loss = torch.tensor(value if rank == bad_rank else 0.5, requires_grad=True) * 2
        try:
            check_finite_loss(loss)
            outcomes.append("passed")
        except NonFiniteLoss as exc:
            outcomes.append(str(exc))
    Path(out, f"rank{rank}.json").write_text(json.dumps(outcomes))
    teardown()


def test_one_rank_non_finite_loss_stops_every_rank(tmp_path: Path) -> None:
    rendezvous = RendezvousStore()
    context = mp.start_processes(_rank_main, args=(2, rendezvous.env, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):  # True once every rank is done
            assert time.monotonic() < deadline, f"the ranks did not finish within {TIMEOUT_S} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [
            "passed", "the loss is not finite on rank 1", "the loss is not finite on rank 0"]
