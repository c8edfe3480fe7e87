"""Decoder sequence layout and attention masks for CATs.

The reference decoder interleaves, for every chunk k, one compressed vector followed by the
chunk's tokens: ``[fx_0, t_0 .. t_{C-1}, fx_1, t_C .. ]``. Its mask (fx positions visible to
everything after them, tokens visible inside their chunk) then touches every 128x128 tile
of the attention matrix below the diagonal, so FlexAttention can skip nothing.

cat_titan computes the same function on a permuted sequence: all tokens first, then all
compressed vectors (the "prefix" of slots, named for its role: the compressed past)::

    [t_0 .. t_{L-1} | fx_0 .. fx_K | pad]                      (fixed chunk size)
    [t_0 .. t_{L-1} | fx_0, sep_0, fx_1, sep_1 .. fx_K, sep_K | pad]   (adaptive: separators)

Attention is equivariant to a permutation applied consistently to positions, RoPE ids and
the mask, so outputs are identical; but now a tile of token queries only meets the slots
(K+1 or 2K+2 keys) and its own diagonal tile: attention cost ~ (K + 128) per query instead of
~ L/2. Tokens come first so that token tiles start at position 0, aligned with the kernel's
128-wide tiles: a tile of 128 token queries then meets exactly one diagonal tile (with the
slots first, every token tile straddled two; measured on an H200, forward + backward of the
reference-sized decoder attention: 1.72 -> 1.50 ms). RoPE ids keep the reference's "restart
in every chunk" numbering: fx -> 0, sep -> 1, token j of a chunk -> (1 or 2) + j.

Mask rule (q, kv are decoder positions; group(p) is the chunk index a position belongs to,
fx_k and sep_k belong to group k, tokens of chunk k to group k):
  - kv is fx:  group(kv) <= group(q)               (compressed past, and own slot)
  - kv is sep: group(kv) == group(q), q not fx     (own separator)
  - kv is tok: q is tok, same group, kv <= q       (causal inside the chunk)
  - pad queries see only themselves (keeps SDPA rows finite; their outputs are dropped).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

FX, SEP, TOK, PAD = 0, 1, 2, 3


@dataclass(frozen=True)
class CatLayout:
    seq_len: int  # L, a multiple of chunk_size
    chunk_size: int  # C
    with_sep: bool  # adaptive CATs add a separator after every compressed vector
    pad_multiple: int = 1  # decoder length rounded up to this (sequence parallel, kernels)

    @property
    def num_chunks(self) -> int:
        return self.seq_len // self.chunk_size

    @property
    def prefix_len(self) -> int:
        """Number of slot positions (fx, and sep for adaptive CATs)."""
        return (self.num_chunks + 1) * (2 if self.with_sep else 1)

    @property
    def token_start(self) -> int:
        """Decoder position of token 0."""
        return 0

    @property
    def slot_start(self) -> int:
        """Decoder position of slot 0 (fx_0)."""
        return self.seq_len

    @property
    def real_len(self) -> int:
        return self.prefix_len + self.seq_len

    @property
    def length(self) -> int:
        m = self.pad_multiple
        return -(-self.real_len // m) * m

    @property
    def rope_span(self) -> int:
        """Largest RoPE id + 1."""
        return self.chunk_size + (2 if self.with_sep else 1)

    def tables(self, device: torch.device | str | None = None) -> "LayoutTables":
        return _tables(self, str(torch.device(device or "cpu")))


@dataclass(frozen=True)
class LayoutTables:
    kind: torch.Tensor  # (S,) FX/SEP/TOK/PAD per decoder position
    group: torch.Tensor  # (S,) chunk index of each position
    rope_pos: torch.Tensor  # (S,) RoPE id
    out_index: torch.Tensor  # (L,) decoder position whose output predicts input position t + 1


@functools.lru_cache(maxsize=64)
def _tables(layout: CatLayout, device: str) -> LayoutTables:
    L, C, K = layout.seq_len, layout.chunk_size, layout.num_chunks
    S, P = layout.length, layout.prefix_len
    stride = 2 if layout.with_sep else 1
    kind = torch.full((S,), PAD, dtype=torch.long)
    group = torch.zeros(S, dtype=torch.long)
    rope = torch.zeros(S, dtype=torch.long)

    T0, S0 = layout.token_start, layout.slot_start
    slots = torch.arange(K + 1)
    kind[S0 + slots * stride] = FX
    group[S0 + slots * stride] = slots
    if layout.with_sep:
        kind[S0 + slots * stride + 1] = SEP
        group[S0 + slots * stride + 1] = slots
        rope[S0 + slots * stride + 1] = 1
    t = torch.arange(L)
    kind[T0 + t] = TOK
    group[T0 + t] = t // C
    rope[T0 + t] = stride + t % C
    # Group of pad positions (after both): past every real one, so no real query sees them.
    group[P + L:] = K + 1

    # Input position t = kC + j predicts t + 1 from: its own token (j < C-1); for the last
    # token of chunk k, from the slot that opens chunk k+1 (fx_{k+1}, or sep_{k+1} when
    # separators exist), exactly as the reference rearranges its outputs.
    last = (t % C) == C - 1
    open_next = S0 + (t // C + 1) * stride + (1 if layout.with_sep else 0)
    out_index = torch.where(last, open_next, T0 + t)
    dev = torch.device(device)
    return LayoutTables(kind.to(dev), group.to(dev), rope.to(dev), out_index.to(dev))


def cat_mask_mod(tables: LayoutTables):
    """mask_mod(b, h, q, kv) -> bool: the rule above read off the layout tables, line by
    line. The models use ``layout_mask_mod`` (the same mask, computed without lookups, which
    FlexAttention runs 2.3x faster); this form is the oracle tests compare it with."""
    kind, group = tables.kind, tables.group

    def mask_mod(b, h, q_idx, kv_idx):
        kq, kk = kind[q_idx], kind[kv_idx]
        gq, gk = group[q_idx], group[kv_idx]
        see_fx = (kk == FX) & (gk <= gq)
        see_sep = (kk == SEP) & (gk == gq) & (kq != FX)
        see_tok = (kk == TOK) & (kq == TOK) & (gk == gq) & (kv_idx <= q_idx)
        real = (see_fx | see_sep | see_tok) & (kq != PAD)
        return real | ((kq == PAD) & (q_idx == kv_idx))

    return mask_mod


def layout_mask_mod(layout: CatLayout):
    """The same rule as ``cat_mask_mod``, computed from the positions by integer arithmetic
    instead of table lookups: FlexAttention evaluates it on every score of every partial
    tile (nearly all of the CAT's tiles), so its op count is kernel time.

    Slots are numbered r = kv - L. A query's *slot horizon* h is the last slot it may see:
    a token of chunk k sees up to its own separator (h = stride*k + stride - 1), a slot
    query up to itself (h = q - L). Slot r is visible iff r <= h and, with separators, r is
    an fx (even) or r == h (the query's own separator, or itself)."""
    L, C = layout.seq_len, layout.chunk_size
    real, sep = layout.real_len, layout.with_sep
    stride = 2 if sep else 1
    assert layout.token_start == 0 and layout.slot_start == L  # the arithmetic assumes [tokens | slots | pad]

    def mask_mod(b, h, q_idx, kv_idx):
        q_tok = q_idx < L
        horizon = torch.where(q_tok, (q_idx // C) * stride + (stride - 1), q_idx - L)
        r = kv_idx - L
        see_slot = (r <= horizon) & (kv_idx < real)
        if sep:
            see_slot = see_slot & ((r % 2 == 0) | (r == horizon))
        see_tok = q_tok & (q_idx // C == kv_idx // C) & (kv_idx <= q_idx)
        see = torch.where(kv_idx < L, see_tok, see_slot)
        return torch.where(q_idx < real, see, q_idx == kv_idx)  # pad queries see only themselves

    return mask_mod


def dense_mask(mask_mod, length: int, device) -> torch.Tensor:
    """(S, S) boolean mask (True = attend) built from the same mask function."""
    idx = torch.arange(length, device=device)
    return mask_mod(None, None, idx[:, None], idx[None, :])


@functools.lru_cache(maxsize=32)
def _dense_cat_mask(layout: CatLayout, device: str) -> torch.Tensor:
    return dense_mask(layout_mask_mod(layout), layout.length, device)


@functools.lru_cache(maxsize=32)
def _block_cat_mask(layout: CatLayout, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(layout_mask_mod(layout), B=None, H=None,
                             Q_LEN=layout.length, KV_LEN=layout.length, device=device)


def cat_attention_mask(layout: CatLayout, backend: str, device):
    """The mask object the attention backend consumes: a BlockMask (flex) or a bool tensor."""
    dev = str(torch.device(device))
    if backend == "flex":
        return _block_cat_mask(layout, dev)
    return _dense_cat_mask(layout, dev)


def reference_cat_mask(length: int, group_size: int) -> torch.Tensor:
    """The reference's interleaved mask (get_cat_mask), for tests of the permutation."""
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    within = (q // group_size) == (kv // group_size)
    divides = (kv % group_size) == 0
    return (within | divides) & (q >= kv)
