"""One process group for TorchRec and DeepSpeed: NCCL on GPU, gloo on CPU; world size 1 without a launcher."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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


class RendezvousStore:
    """A TCPStore served on a port the OS picked, held open while other processes rendezvous on it.

    Picking a free port and binding it later races with every other process on the machine; a port
    held from the start cannot be taken. Processes started with `env` join it as clients: torchrun's
    c10d rendezvous becomes a client when its endpoint is already served, and env:// rendezvous does
    so with TORCHELASTIC_USE_AGENT_STORE. Use one per launch (keys of a finished launch stay in it).
    """

    def __init__(self) -> None:
        self.store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)

    @property
    def port(self) -> int:
        return self.store.port

    @property
    def env(self) -> dict[str, str]:
        return {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(self.port), "TORCHELASTIC_USE_AGENT_STORE": "True"}


def launch_local(script: Path, nprocs: int, args: list[str], threads: int, cwd: Path, nnodes: int = 1,
                 rendezvous: RendezvousStore | None = None, **popen: object) -> subprocess.Popen:
    """torchrun of `script args` as `nprocs` processes on this machine, `threads` torch threads each.

    With `nnodes` > 1 this is one node of that many: launch one per node with the same `rendezvous`
    (torchrun agents on one machine standing in for hosts). The rendezvous endpoint is served by this
    process until the launch is collected; RANK, WORLD_SIZE and LOCAL_RANK of a launching process are
    not passed on. The caller waits for the Popen.
    """
    rendezvous = rendezvous or RendezvousStore()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(nnodes), "--nproc-per-node", str(nprocs),
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rendezvous.port}", str(script), *args]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, **popen)
    proc.rendezvous = rendezvous  # served until the launch is collected
    return proc


def init_distributed() -> DistInfo:
    """Join the process group torchrun/Ray set up in the environment, or make a world of one.

    A world of one serves its own store on a port the OS picks (tcp://127.0.0.1:0), so concurrent
    single-process runs never compete for a port.
    """
    launched = "RANK" in os.environ and "MASTER_PORT" in os.environ
    if not launched:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    device_id = device if device.type == "cuda" else None
    if not dist.is_initialized() and not launched:
        dist.init_process_group(backend=backend, init_method="tcp://127.0.0.1:0", rank=0, world_size=1,
                                device_id=device_id)
    elif not dist.is_initialized():
        # torchrun's restarted workers rendezvous again on the agent's store, where the killed attempt's
        # process-group keys (every rank's gloo address) are still set: keep each attempt's keys apart.
        store, rank, world_size = next(dist.rendezvous("env://"))
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, device_id=device_id)
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
