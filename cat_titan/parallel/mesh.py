"""Process groups and the device mesh: (dp_replicate, dp_shard, tp) from the configured degrees."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    world: int
    rank: int
    local_rank: int
    dp_replicate: int
    dp_shard: int
    tp: int
    device: torch.device
    mesh: Optional[DeviceMesh] = None
    dp_mesh: Optional[DeviceMesh] = None  # dp_replicate x dp_shard flattened

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def dp_rank(self) -> int:
        return 0 if self.dp_mesh is None else self.dp_mesh.get_local_rank()

    @property
    def fsdp_mesh(self) -> Optional[DeviceMesh]:
        """1-D (FSDP) or 2-D (HSDP: replicate x shard) mesh for fully_shard."""
        if self.mesh is None:
            return None
        if self.dp_replicate > 1:
            return self.mesh["dp_replicate", "dp_shard"]
        return self.mesh["dp_shard"]

    @property
    def tp_mesh(self) -> Optional[DeviceMesh]:
        return self.mesh["tp"] if self.mesh is not None and self.tp > 1 else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> tuple[int, int, int]:
    """Start the default process group (also for a single process, so that one code path
    serves 1..N ranks). Returns (world, rank, local_rank)."""
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if "RANK" in os.environ:  # torchrun / Slurm: rendezvous from the environment
            dist.init_process_group(backend=backend)
        else:  # plain `python train.py`: a group of one, in memory (no port, no variables left
            # behind for processes this one starts)
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))


def build_parallel_dims(dp_replicate: int, dp_shard: int, tp: int, device: torch.device) -> ParallelDims:
    world, rank, local_rank = init_distributed(device.type)
    if dp_shard == -1:
        dp_shard = world // (dp_replicate * tp)
    if dp_replicate * dp_shard * tp != world:
        raise ValueError(f"dp_replicate={dp_replicate} x dp_shard={dp_shard} x tp={tp} != world size {world}")
    mesh = init_device_mesh(device.type, (dp_replicate, dp_shard, tp),
                            mesh_dim_names=("dp_replicate", "dp_shard", "tp"))
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")  # data-parallel rank for the loader
    return ParallelDims(world, rank, local_rank, dp_replicate, dp_shard, tp, device, mesh, dp_mesh)


def all_reduce_max(x: float, device: torch.device) -> float:
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
