"""Deterministic, resumable sampling of training windows, independent of the data-parallel size.

Ordering rule. A split of T tokens has N = (T - 1) // seq_len windows; window i is
``tokens[i*seq_len : i*seq_len + seq_len + 1]`` (inputs = w[:-1], labels = w[1:]). The global
sample stream g = 0, 1, 2, ... visits epoch e = g // N in the order ``shuffle(N, seed, e)``
(``shuffle(...)[j]`` is the window at position j of the epoch), forever. The shuffle is a keyed
pseudo-random permutation (a Feistel network over the next even number of bits, cycle-walked
into [0, N)) evaluated per index: O(1) memory and time per sample, where materialising a
permutation costs 8 bytes per window in every rank and data worker (~4 GB each for 1T tokens
at seq_len 2048). Loader states of version 1 (written before this rule) keep their original
order, ``numpy.random.default_rng([seed, e]).permutation(N)``, so old checkpoints resume
exactly. Optimizer step s owns samples
[s*GB, (s+1)*GB); with dp_world W, accumulation A and micro-batch mb = GB // (W*A), rank r
reads at micro-step m the samples ``s*GB + m*W*mb + r*mb + [0, mb)``. Which samples form a step
therefore depends only on (seed, seq_len, GB), never on W or A, and the loader's state is one
global number: the samples consumed by all ranks together.
"""

from __future__ import annotations

import itertools
import os
import signal
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cat_titan.data.shards import DataError, ShardedTokens

STATE_VERSION = 2  # 2: Feistel shuffle; 1: numpy permutation (still resumable, see above)
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """splitmix64 finaliser of x + key (uint64 arrays, arithmetic modulo 2**64)."""
    z = x + key + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class Shuffle:
    """A pseudo-random permutation of [0, n) keyed by (seed, epoch), evaluated per index.

    Balanced Feistel network on 2h bits (2**(2h) >= n, the smallest even width: at most 4n
    values), 6 rounds of splitmix64, and cycle walking: an output >= n is encrypted again
    until it lands in [0, n), which keeps the map a bijection on [0, n)."""

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = np.uint64((bits + 1) // 2)
        self.mask = np.uint64((1 << int(self.half)) - 1)
        rng = np.random.default_rng([seed, epoch, 0xFE15])
        self.keys = [np.uint64(k) for k in rng.integers(0, 2**63, self.ROUNDS, dtype=np.uint64)]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        with np.errstate(over="ignore"):
            for key in self.keys:
                left, right = right, left ^ (_mix(right, key) & self.mask)
        return (left << self.half) | right

    def __call__(self, idx) -> np.ndarray:
        shape = np.shape(idx)
        x = np.asarray(idx, dtype=np.uint64).reshape(-1)
        if x.size and int(x.max()) >= self.n:
            raise IndexError(f"index {int(x.max())} out of range for a shuffle of {self.n}")
        y = self._encrypt(x)
        out_of_range = y >= np.uint64(self.n)
        while out_of_range.any():  # cycle walking: ~1.3 rounds on average, 4 at most expected
            y[out_of_range] = self._encrypt(y[out_of_range])
            out_of_range = y >= np.uint64(self.n)
        return y.astype(np.int64).reshape(shape)
# Fields a checkpoint must share with the loader resuming it: they define the stream.
_STREAM_FIELDS = ("seq_len", "seed", "global_batch", "num_windows", "data_fingerprint")

Batch = tuple[torch.Tensor, torch.Tensor]


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGTERM and SIGUSR1: Slurm signals every process of a step, and a
    worker that died of it crashed its trainer before the preemption save. The trainer decides
    when to stop and shuts its workers down (they also exit when it does)."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


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
        self.version = STATE_VERSION  # the ordering rule in use (1: numpy permutation)
        self._epoch, self._order = -1, None

    def window(self, g: int) -> int:
        epoch, i = divmod(g, self.num_windows)
        if epoch != self._epoch:
            # One epoch's order kept: the stream moves forward, a batch crosses a boundary at most once.
            self._epoch = epoch
            if self.version == 1:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows).__getitem__
            else:
                self._order = Shuffle(self.num_windows, self.seed, epoch)
        return int(self._order(i))

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
                # Every iterator draws a base seed (for its workers) from this generator; by
                # default that is torch's global one, which checkpoints save for exact resume,
                # and a resumed loader starts one iterator more than the run it continues.
                generator=torch.Generator().manual_seed(self.seed),
                worker_init_fn=_ignore_stop_signals,
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
            "version": self._dataset.version,
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
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise DataError(f"cannot resume the data loader: its state has version {version!r}, this cat_titan "
                            f"reads 1 and {STATE_VERSION}; resume with the cat_titan that wrote it, or start the "
                            f"data stream afresh")
        for field in _STREAM_FIELDS:
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
        if version != self._dataset.version:  # a version-1 stream continues in its own order
            self._dataset.version = version
            self._dataset._epoch = -1
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
