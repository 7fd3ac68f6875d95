"""One process group for TorchRec and DeepSpeed: NCCL on GPU, gloo on CPU; world size 1 without a launcher."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a local rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join the process group torchrun/Ray set up in the environment, or make a world of one."""
    if "RANK" not in os.environ:  # not launched: a single-process world on this machine
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # torchrun's restarted workers rendezvous again on the agent's store, where the killed attempt's
        # process-group keys (every rank's gloo address) are still set: keep each attempt's keys apart.
        store, rank, world_size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def teardown(failed: bool = False) -> None:
    """Leave the process group cleanly (a rank that skips this can abort at interpreter exit).

    Args:
        failed: this rank stops on an error: leave without the barrier, which the other ranks (busy in
            a collective, or stopping on the same error) might never reach; the launcher then ends them.
    """
    if dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()
