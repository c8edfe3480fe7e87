"""Deterministic, resumable sampling of training windows, independent of the data-parallel size.

Ordering rule. A split of T tokens has N = (T - 1) // seq_len windows; window i is
``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (inputs = w[:-1], labels = w[1:]). The global
sample stream g = 0, 1, 2, ... visits epoch e = g // N in the order
``numpy.random.default_rng([seed, e]).permutation(N)``, forever. Optimizer step s owns samples
[s*GB, (s+1)*GB); with dp_world W, accumulation A and micro-batch mb = GB // (W*A), rank r
reads at micro-step m the samples ``s*GB + m*W*mb + r*mb + [0, mb)``. Which samples form a step
therefore depends only on (seed, seq_len, GB), never on W or A, and the loader's state is one
global number: the samples consumed by all ranks together.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cat_titan.data.shards import DataError, ShardedTokens

STATE_VERSION = 1
# Fields a checkpoint must share with the loader resuming it: they define the stream.
_STREAM_FIELDS = ("seq_len", "seed", "global_batch", "num_windows", "data_fingerprint")

Batch = tuple[torch.Tensor, torch.Tensor]


def _open(data: ShardedTokens | str | os.PathLike, split: str) -> ShardedTokens:
    return data if isinstance(data, ShardedTokens) else ShardedTokens(data, split)


def _num_windows(data: ShardedTokens, seq_len: int) -> int:
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    n = (data.num_tokens - 1) // seq_len
    if n < 1:
        raise DataError(
            f"the {data.split!r} split of {data.data_dir} has {data.num_tokens} tokens, too few "
            f"for seq_len {seq_len} (one window needs seq_len + 1 = {seq_len + 1}); use a "
            "smaller seq_len or more data"
        )
    return n


def _rows(data: ShardedTokens, windows: Iterable[int], seq_len: int) -> Batch:
    rows = np.stack([data[w * seq_len : w * seq_len + seq_len + 1] for w in windows])
    t = torch.from_numpy(rows.astype(np.int64))  # (mb, seq_len + 1)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()  # (mb, seq_len) each


class _Windows(Dataset):
    """Map-style dataset: index = first global sample of a micro-batch -> that micro-batch.

    Stateless apart from a cache of one epoch's permutation, so it can run in any worker.
    """

    def __init__(self, data: ShardedTokens, seq_len: int, seed: int, micro_batch: int):
        self.data, self.seq_len, self.seed, self.micro_batch = data, seq_len, seed, micro_batch
        self.num_windows = _num_windows(data, seq_len)
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def window(self, g: int) -> int:
        epoch, i = divmod(g, self.num_windows)
        if epoch != self._epoch:
            # One epoch cached: the stream moves forward, a batch crosses a boundary at most once.
            self._epoch = epoch
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return int(self._perm[i])

    def __getitem__(self, start: int) -> Batch:
        windows = [self.window(g) for g in range(start, start + self.micro_batch)]
        return _rows(self.data, windows, self.seq_len)


class _Starts(Sampler):
    """The infinite sequence first, first + stride, ...: one rank's micro-batch starts."""

    def __init__(self, first: int, stride: int):
        self.first, self.stride = first, stride

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.first, self.stride)


class TokenLoader:
    """Micro-batches for one data-parallel rank, in the order of the module's ordering rule.

    ``num_workers > 0`` prefetches in DataLoader worker processes; what was prefetched but not
    returned by :meth:`next_batch` is not consumed, so :meth:`state_dict` is exact at any time.
    """

    def __init__(
        self,
        data: ShardedTokens | str | os.PathLike,
        *,
        split: str = "train",
        seq_len: int,
        global_batch: int,
        micro_batch: int,
        dp_rank: int = 0,
        dp_world: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        pin_memory: bool = False,
        device: torch.device | str | None = None,
    ):
        problems = [
            f"{name} must be >= {low}, got {value}"
            for name, value, low in (
                ("global_batch", global_batch, 1),
                ("micro_batch", micro_batch, 1),
                ("dp_world", dp_world, 1),
                ("seed", seed, 0),
                ("num_workers", num_workers, 0),
            )
            if value < low
        ]
        if not 0 <= dp_rank < dp_world:
            problems.append(f"dp_rank must lie in [0, dp_world={dp_world}), got {dp_rank}")
        if not problems and global_batch % (micro_batch * dp_world):
            problems.append(
                f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} x "
                f"dp_world {dp_world} = {micro_batch * dp_world}"
            )
        if problems:
            raise DataError("invalid data loader settings: " + "; ".join(problems))
        self.data = _open(data, split)
        self.seq_len, self.seed = seq_len, seed
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.accum_steps = global_batch // (micro_batch * dp_world)
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.accelerator.is_available()
        self.device = torch.device(device) if device is not None else None
        self._dataset = _Windows(self.data, seq_len, seed, micro_batch)
        self.num_windows = self._dataset.num_windows
        self.samples_consumed = 0  # by all ranks together; advances W*mb per micro-batch
        self._batches: Iterator[Batch] | None = None

    def _start_iter(self) -> Iterator[Batch]:
        # One DataLoader path for every num_workers: with 0 it computes on demand, in order.
        first = self.samples_consumed + self.dp_rank * self.micro_batch
        return iter(
            DataLoader(
                self._dataset,
                batch_size=None,
                sampler=_Starts(first, self.dp_world * self.micro_batch),
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
            )
        )

    def next_batch(self) -> Batch:
        """The next micro-batch: (inputs, labels), LongTensors of shape (micro_batch, seq_len)."""
        if self._batches is None:
            self._batches = self._start_iter()
        inputs, labels = next(self._batches)
        self.samples_consumed += self.dp_world * self.micro_batch
        if self.device is not None:
            inputs = inputs.to(self.device, non_blocking=self.pin_memory)
            labels = labels.to(self.device, non_blocking=self.pin_memory)
        return inputs, labels

    def state_dict(self) -> dict:
        """Global (rank-independent) position; JSON-safe."""
        return {
            "version": STATE_VERSION,
            "samples_consumed": self.samples_consumed,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_windows": self.num_windows,
            "data_fingerprint": self.data.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue the stream saved in ``state``; any dp_world/accumulation that tiles it."""
        ours = self.state_dict()
        for field in ("version",) + _STREAM_FIELDS:
            if state.get(field) != ours[field]:
                raise DataError(
                    f"cannot resume the data loader: {field} is {state.get(field)!r} in the "
                    f"checkpoint but {ours[field]!r} now. Resume with the original {field} "
                    "(and data), or start the data stream afresh"
                )
        consumed = int(state["samples_consumed"])
        offset = consumed % self.global_batch
        if offset % (self.dp_world * self.micro_batch):
            raise DataError(
                f"the checkpoint was taken {offset} samples into a step, which dp_world "
                f"{self.dp_world} x micro_batch {self.micro_batch} cannot continue from; resume "
                "with the original dp_world and micro_batch, or from a step boundary"
            )
        self.samples_consumed = consumed
        self._batches = None  # drops prefetched batches of the old position


def validation_batches(
    data: ShardedTokens | str | os.PathLike,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    split: str = "val",
    dp_rank: int = 0,
    dp_world: int = 1,
) -> list[Batch]:
    """A fixed evaluation set: windows 0, 1, 2, ... in order, ``batch_size`` per global batch.

    Rank r holds rows [r*bs/W, (r+1)*bs/W) of each global batch, as in training; incomplete
    batches are dropped so that every rank evaluates the same number of batches.
    """
    data = _open(data, split)
    if batch_size < 1 or batch_size % dp_world:
        raise DataError(
            f"validation batch_size {batch_size} must be a positive multiple of dp_world {dp_world}"
        )
    n = _num_windows(data, seq_len)
    num_batches = n // batch_size
    if num_batches == 0:
        raise DataError(
            f"the {data.split!r} split of {data.data_dir} has {n} windows of seq_len {seq_len}, "
            f"fewer than one validation batch of {batch_size}; lower the batch size or seq_len"
        )
    if max_batches is not None:
        num_batches = min(num_batches, max_batches)
    per_rank = batch_size // dp_world
    firsts = (b * batch_size + dp_rank * per_rank for b in range(num_batches))
    return [_rows(data, range(first, first + per_rank), seq_len) for first in firsts]
