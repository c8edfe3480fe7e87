"""CAT as a drop-in attention layer, and hybrid stacks mixing CAT and dense layers.

A CAT layer replaces a block's attention: it compresses each chunk of the (normed) hidden
states with one linear map, widens the tokens to ``dim_fx``, runs attention on the CAT
sequence layout (masks.py) and projects back. ``layer_pattern`` (e.g. [cat, cat, dense])
repeats over the depth; dense layers use ordinary causal attention.

Reference quirk kept for weight compatibility: the inner attention has heads of width
``cat_layer_head_dim`` (64) but rotates only the first dim/n_heads features of each head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .args import ModelArgs
from .base import BaseModel, RopeBuffer
from .common import Attention, OutputHead, TransformerBlock
from .masks import CatLayout, cat_attention_mask


@dataclass
class CatContext:
    """Per-forward layout data every CAT layer needs (built once, shared by all layers)."""

    mask: object  # BlockMask or bool tensor
    out_index: Tensor  # (L,)
    pad: int  # zero positions appended after the tokens
    chunk_size: int


class CatAttention(nn.Module):
    def __init__(self, args: ModelArgs, fused: bool):
        super().__init__()
        D, Dfx, C, hd = args.dim, args.fx_dim, args.chunk_size, args.cat_layer_head_dim
        self.chunk_size = C
        self.expand = nn.Linear(D, Dfx, bias=False)
        self.compress = nn.Linear(C * D, Dfx, bias=True)
        self.cond = nn.Embedding(1, Dfx)
        # rotary width (dim/n_heads) comes from the cos/sin tables the model passes in
        self.inner = Attention(Dfx, Dfx // hd, Dfx // hd, hd, args.qk_norm, args.norm_eps, fused=fused)
        self.final_proj = nn.Linear(Dfx, D, bias=False)

    def sequence(self, x: Tensor, pad: int) -> Tensor:
        """Hidden states (B, L, D) -> the inner attention's sequence (B, S, Dfx):
        [tokens | dummy, f(c_0..c_{K-1}) | pad], the layout of masks.py."""
        B, L, D = x.shape
        C = self.chunk_size
        fx = self.compress(x.reshape(B, L // C, C * D))  # (B, K, Dfx)
        Dfx = fx.shape[-1]
        parts = [self.expand(x), self.cond.weight.view(1, 1, Dfx).expand(B, 1, Dfx), fx]
        if pad:
            parts.append(fx.new_zeros(B, pad, Dfx))
        return torch.cat(parts, dim=1)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], ctx: CatContext) -> Tensor:
        h = self.inner(self.sequence(x, ctx.pad), rope, ctx.mask)
        h = h.index_select(1, ctx.out_index)  # (B, L, Dfx)
        return self.final_proj(h)  # (B, L, D)

    def init_weights(self, init, std: float, out_std: float) -> None:
        init.normal(self.expand.weight, std)
        init.normal(self.compress.weight, std)
        init.zeros(self.compress.bias)
        init.normal(self.cond.weight, std)
        self.inner.init_weights(init, std, std)
        init.normal(self.final_proj.weight, out_std)


class CatLayerBlock(TransformerBlock):
    """A pre-norm block whose attention is a CatAttention."""

    def __init__(self, args: ModelArgs, fused: bool):
        super().__init__(args.dim, args.n_heads, args.kv_heads, args.ffn_dim, norm_eps=args.norm_eps, fused=fused,
                         attention=CatAttention(args, fused))


class CatLayerTransformer(BaseModel):
    def __init__(self, args: ModelArgs, decoder_pad_multiple: int = 1):
        super().__init__()
        self.args = args
        self.decoder_pad_multiple = decoder_pad_multiple
        fused = args.fused_ops == "on"
        self.kinds = args.layer_kinds()
        self.tok_embeddings = nn.Embedding(args.padded_vocab_size, args.dim)
        self.layers = nn.ModuleList(
            CatLayerBlock(args, fused) if kind == "cat" else
            TransformerBlock(args.dim, args.n_heads, args.kv_heads, args.ffn_dim, qk_norm=args.qk_norm,
                             norm_eps=args.norm_eps, fused=fused)
            for kind in self.kinds)
        self.head = OutputHead(args.dim, args.padded_vocab_size, args.norm_eps, fused)
        hd = args.dim // args.n_heads
        self.rope = RopeBuffer(hd, args.block_size, args.rope_base)  # dense layers
        self.cat_rope = RopeBuffer(hd, args.chunk_size + 1, args.rope_base)  # CAT layers: rotary width dim/n_heads

    def forward(self, tokens: Tensor, labels: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> Tensor:
        self.check_tokens(tokens)
        C = self.resolve_chunk_size(chunk_size)
        L0 = tokens.shape[1]
        # whole chunks for the CAT layers, even sequence shards under TP for the dense ones
        tokens, labels = self.pad_sequence(tokens, labels, math.lcm(C, self.seq_pad_multiple), fallback=C)
        L = tokens.shape[1]
        x = self.tok_embeddings(tokens)  # (B, L, D)
        dense_rope = self.rope.first(L)
        if "cat" in self.kinds:
            layout = CatLayout(L, C, False, self.decoder_pad_multiple)
            tables = layout.tables(x.device)
            ctx = CatContext(cat_attention_mask(layout, self.args.attn_backend, x.device), tables.out_index,
                             layout.length - layout.real_len, C)
            cat_rope = self.cat_rope.gather(tables.rope_pos)
        for kind, layer in zip(self.kinds, self.layers):
            x = layer(x, cat_rope, ctx) if kind == "cat" else layer(x, dense_rope, None)
        return self.unpad(self.head(x, labels), labels, L0)  # (B, L0, V) or the loss
