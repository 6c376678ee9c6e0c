"""Process-group set-up: the same code on CPU (gloo) and GPU (nccl)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> DistEnv:
    """Joins the process group described by torchrun/torchx's environment variables.

    Without them (a plain ``python`` process) it creates a one-rank group on localhost, so
    the same sharded code path runs everywhere. CUDA → nccl on ``cuda:LOCAL_RANK``; else gloo on CPU.
    """
    from recsys_mtl.distributed.noise import quiet_known_noise

    quiet_known_noise()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set; launch with torchrun/torchx")
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend)


_CONTROL_GROUP: dict[str, dist.ProcessGroup | None] = {}


def control_group(env: DistEnv) -> dist.ProcessGroup | None:
    """A CPU (gloo) process group for host-side control flags ("bad data on some rank", row
    counts), so the step loop never synchronises the device for them.

    With gloo the world group already runs on the CPU and is returned; with nccl a gloo group
    over the same ranks is created once (collective: every rank must call this, in the same
    order relative to other group creations). None for a one-rank job (no flags to exchange).
    """
    if env.world_size == 1 or not dist.is_initialized():
        return None
    if env.backend == "gloo":
        return dist.GroupMember.WORLD
    if "gloo" not in _CONTROL_GROUP:
        _CONTROL_GROUP["gloo"] = dist.new_group(backend="gloo")
    return _CONTROL_GROUP["gloo"]
