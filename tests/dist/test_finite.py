"""The non-finite guard agrees across ranks: a NaN loss on one rank stops both, naming that rank."""

from __future__ import annotations

import json
import os
from pathlib import Path

from lcron_dist.distributed.process_group import RendezvousStore
from ranks import run_ranks  # tests/ is on sys.path (conftest.py's folder)

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
    run_ranks(_rank_main, (2, rendezvous.env, str(tmp_path)), nprocs=2, timeout_s=120)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [
            "passed", "the loss is not finite on rank 1", "the loss is not finite on rank 0"]
