"""Chunk-size schedule for adaptive CATs.

The chunk size of a (step, micro-step) is a pure function of (seed, step, micro-step): every
rank computes the same sequence without communicating, and a resumed run continues it. With
per=micro_step the micro-step index is the rank's own: all ranks run one size at a time (no
rank waits for another's slower size), so the schedule depends on the number of micro-steps
per step (global_batch / (micro_batch x data-parallel ranks)); a resume that changes it
continues with another schedule, and says so.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


class ChunkCurriculum:
    def __init__(self, sizes: Sequence[int], kind: str = "uniform", weights: Sequence[float] = (),
                 per: str = "step", seed: int = 0):
        if not sizes:
            raise ValueError("the curriculum needs at least one chunk size")
        self.sizes = list(sizes)
        self.kind, self.per, self.seed = kind, per, seed
        if kind == "weights":
            if len(weights) != len(self.sizes):
                raise ValueError(f"curriculum weights {list(weights)} must have one entry per chunk size {self.sizes}")
            w = np.asarray(weights, dtype=np.float64)
            self.probs = w / w.sum()
        else:
            self.probs = None

    def chunk_size(self, step: int, micro_step: int = 0, accum_steps: int = 1) -> int:
        """Chunk size for optimizer step ``step`` (0-based) and its micro-step."""
        if self.kind == "fixed":
            return self.sizes[-1]
        micro = micro_step if self.per == "micro_step" else 0
        if self.kind == "round_robin":  # the reference's training loop cycles through sizes
            index = step * accum_steps + micro if self.per == "micro_step" else step
            return self.sizes[index % len(self.sizes)]
        rng = np.random.default_rng([self.seed, 0xC4A7, step, micro])
        return int(rng.choice(self.sizes, p=self.probs))

    @property
    def drawn_sizes(self) -> list[int]:
        """The sizes this schedule ever draws (what evaluation and sampling should use): the
        largest only for kind=fixed, none of weight 0 for kind=weights."""
        if self.kind == "fixed":
            return [self.sizes[-1]]
        if self.probs is not None:
            return [c for c, p in zip(self.sizes, self.probs) if p > 0]
        return list(self.sizes)

    def state_dict(self) -> dict:
        """Stateless by design: recorded so a resume can check the schedule is unchanged."""
        return {"sizes": self.sizes, "kind": self.kind, "per": self.per, "seed": self.seed,
                "probs": None if self.probs is None else self.probs.tolist()}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        changed = [k for k in mine if state.get(k) != mine[k]]
        if changed:
            import warnings

            warnings.warn(f"chunk-size curriculum changed on resume ({', '.join(changed)}): "
                          f"checkpoint {[state.get(k) for k in changed]} -> now {[mine[k] for k in changed]}")


def build_curriculum(model_args, cfg_curriculum, seed: int) -> Optional[ChunkCurriculum]:
    if model_args.kind != "cat_adaptive":
        return None
    from ..config import sizes_between

    top = cfg_curriculum.max_chunk_size or model_args.chunk_size
    sizes = sizes_between(cfg_curriculum.min_chunk_size, top)
    return ChunkCurriculum(sizes, cfg_curriculum.kind, cfg_curriculum.weights, cfg_curriculum.per, seed)
