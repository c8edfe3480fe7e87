"""Layout-independent, seeded parameter initialisation.

Every module with parameters has ``init_weights(init, ...)`` and calls ``init.normal`` /
``init.ones`` on its parameters in a fixed order. ``Initializer`` draws the *full* tensor
from one seeded generator and copies the local piece into the parameter, so a model gets
the same values whether it is a plain module, FSDP-sharded or tensor-parallel: runs with
different parallel layouts start from identical weights.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Initializer:
    def __init__(self, seed: int, device: torch.device | str | None = None):
        self.device = torch.device(device or "cpu")
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(seed)

    def _assign(self, p: Tensor, full: Tensor) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        full = full.to(device=p.device, dtype=p.dtype)
        with torch.no_grad():
            if isinstance(p, DTensor):
                # Every rank drew the same full tensor: each keeps its own shard, no comms.
                local = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p.to_local().copy_(local)
            else:
                p.copy_(full)

    def normal(self, p: Tensor, std: float) -> None:
        full = torch.empty(p.shape, dtype=torch.float32, device=self.device)
        full.normal_(0.0, std, generator=self.gen)
        self._assign(p, full)

    def ones(self, p: Tensor) -> None:
        self._assign(p, torch.ones(p.shape, dtype=p.dtype, device=self.device))

    def zeros(self, p: Tensor) -> None:
        self._assign(p, torch.zeros(p.shape, dtype=p.dtype, device=self.device))
