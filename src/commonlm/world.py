"""Who this process is among many (rank, world size), and the torchrun / DDP setup and teardown. A plain
`python` run is a world of one and needs none of it. Neutral ground: training, evaluation and (later)
scale-out glue all use it, and it imports none of them."""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_type: str) -> World:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(rank=int(os.environ["RANK"]), local_rank=int(os.environ.get("LOCAL_RANK", "0")), size=size)
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend=backend)
        # Destroyed at exit, not after each run: a second group made in the same process (a script that trains
        # twice, say SFT then DPO) met the first one's keys in torchrun's store and hung at its first collective
        atexit.register(_destroy)
    return world


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def close_world(world: World) -> None:
    """The end of a run: wait for every rank (without it a rank sometimes aborted at shutdown while another
    still talked). The process group itself lives until the process exits, for the next run to use."""
    if world.distributed and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
