"""Compress-And-Attend Transformers with a fixed chunk size or adaptive chunk sizes.

A sequence of L tokens is split into K = L / C chunks. The compressor (a small bidirectional
transformer over each chunk, all chunks as one batch) maps chunk k to f(c_k), a vector of
the decoder's width. The decoder predicts chunk k from f(c_0..c_{k-1}) and chunk k's own
tokens; see masks.py for the sequence layout and the mask.

Adaptive CATs accept every power-of-two chunk size up to ``args.chunk_size``: the compressor
sees a chunk-size token, the decoder a per-size conditioning vector (in the slot of the
learned dummy f for chunk 0) and a separator after every compressed vector, and the
compressor's output projection is resized to the current chunk size by bilinear
interpolation, all as the reference implementation computes them.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .args import ModelArgs
from .base import BaseModel, RopeBuffer
from .common import OutputHead, RMSNorm, TransformerBlock, init_stds
from .masks import CatLayout, cat_attention_mask


class Compressor(nn.Module):
    """Maps chunks (B, K, c) of token ids to compressed vectors (B, K, dim_fx)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.adaptive = args.kind == "cat_adaptive"
        dim, fused = args.compressor_dim, args.fused_ops == "on"
        self.n_prefix = 2 if self.adaptive else 1  # [size token,] chunk-position token
        self.tok_embeddings = nn.Embedding(args.padded_vocab_size, dim)
        # The adaptive model may run with chunk size 1, hence one position per token.
        n_pos = args.block_size if self.adaptive else args.block_size // args.chunk_size
        self.chunk_pos = nn.Embedding(n_pos, dim)
        if self.adaptive:
            self.size_tokens = nn.Embedding(len(args.chunk_sizes), dim)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, args.compressor_heads, args.c_kv_heads, args.c_ffn_dim, qk_norm=args.qk_norm,
                             norm_eps=args.norm_eps, fused=fused)
            for _ in range(args.compressor_layers))
        self.norm = RMSNorm(dim, args.norm_eps, fused)
        self.proj_fx = nn.Linear(args.chunk_size * dim, args.fx_dim, bias=False)
        self.rope = RopeBuffer(dim // args.compressor_heads, self.n_prefix + args.chunk_size, args.rope_base)

    def proj_weight(self, c: int) -> Tensor:
        """proj_fx resized to chunk size c (adaptive), as the reference: bilinear, align_corners=False."""
        w = self.proj_fx.weight  # (dim_fx, C_max * dim)
        if c == self.args.chunk_size:
            return w  # interpolation to the same size is the identity
        size = (w.shape[0], c * self.args.compressor_dim)
        return F.interpolate(w[None, None], size=size, mode="bilinear")[0, 0]  # (dim_fx, c * dim)

    def forward(self, chunks: Tensor, size_index: int = 0) -> Tensor:
        B, K, c = chunks.shape
        dim = self.args.compressor_dim
        x = self.tok_embeddings(chunks)  # (B, K, c, Dc)
        prefix = [self.chunk_pos.weight[:K][None, :, None].expand(B, K, 1, dim)]
        if self.adaptive:
            prefix.insert(0, self.size_tokens.weight[size_index].view(1, 1, 1, dim).expand(B, K, 1, dim))
        x = torch.cat(prefix + [x], dim=2).view(B * K, self.n_prefix + c, dim)  # (B*K, P+c, Dc)
        rope = self.rope.first(self.n_prefix + c)
        for layer in self.layers:
            x = layer(x, rope, "full")  # bidirectional inside a chunk
        x = self.norm(x)[:, self.n_prefix:]  # (B*K, c, Dc)
        x = x.reshape(B, K, c * dim)  # flatten the chunk: (B, K, c*Dc)
        return F.linear(x, self.proj_weight(c))  # (B, K, dim_fx)

    def init_weights(self, init) -> None:
        std, out_std = init_stds(self.args.compressor_dim, self.args.compressor_layers)
        init.normal(self.tok_embeddings.weight, std)
        init.normal(self.chunk_pos.weight, std)
        if self.adaptive:
            init.normal(self.size_tokens.weight, std)
        for layer in self.layers:
            layer.init_weights(init, std, out_std)
        self.norm.init_weights(init)
        init.normal(self.proj_fx.weight, std)


class CAT(BaseModel):
    """Fixed-chunk (kind 'cat') or adaptive (kind 'cat_adaptive') CAT."""

    def __init__(self, args: ModelArgs, decoder_pad_multiple: int = 1):
        super().__init__()
        self.args = args
        self.adaptive = args.kind == "cat_adaptive"
        self.decoder_pad_multiple = decoder_pad_multiple
        fused = args.fused_ops == "on"
        self.compressor = Compressor(args)
        self.tok_embeddings = nn.Embedding(args.padded_vocab_size, args.dim)
        # f for "chunk -1": one learned vector; adaptive: one per chunk size (it also tells
        # the decoder which chunk size is in use).
        self.cond = nn.Embedding(len(args.chunk_sizes), args.dim)
        if self.adaptive:
            self.separator = nn.Embedding(1, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args.dim, args.n_heads, args.kv_heads, args.ffn_dim, qk_norm=args.qk_norm,
                             norm_eps=args.norm_eps, fused=fused)
            for _ in range(args.n_layers))
        self.head = OutputHead(args.dim, args.padded_vocab_size, args.norm_eps, fused)
        self.rope = RopeBuffer(args.dim // args.n_heads, args.chunk_size + 2, args.rope_base)

    def layout(self, seq_len: int, chunk_size: int) -> CatLayout:
        return CatLayout(seq_len, chunk_size, self.adaptive, self.decoder_pad_multiple)

    def decoder_inputs(self, tokens: Tensor, chunk_size: int) -> tuple[Tensor, CatLayout]:
        """Token ids (B, L), L a multiple of chunk_size -> decoder sequence (B, S, D)."""
        B, L = tokens.shape
        C, K, D = chunk_size, L // chunk_size, self.args.dim
        size_index = int(math.log2(C)) if self.adaptive else 0
        fx = self.compressor(tokens.view(B, K, C), size_index)  # (B, K, D)
        cond = self.cond.weight[size_index].view(1, 1, D).expand(B, 1, D)
        prefix = torch.cat([cond, fx], dim=1)  # (B, K+1, D): slot k opens chunk k
        if self.adaptive:
            sep = self.separator.weight.view(1, 1, D).expand(B, K + 1, D)
            prefix = torch.stack([prefix, sep], dim=2).view(B, 2 * (K + 1), D)  # fx_k, sep_k, ...
        layout = self.layout(L, C)  # [tokens | slots | pad], see masks.py
        parts = [self.tok_embeddings(tokens), prefix]  # (B, L, D), (B, P, D)
        if layout.length > layout.real_len:
            parts.append(prefix.new_zeros(B, layout.length - layout.real_len, D))
        return torch.cat(parts, dim=1), layout  # (B, S, D)

    def forward(self, tokens: Tensor, labels: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> Tensor:
        self.check_tokens(tokens)
        C = self.resolve_chunk_size(chunk_size)
        L0 = tokens.shape[1]
        tokens, labels = self.pad_sequence(tokens, labels, C, fallback=C)  # whole chunks
        x, layout = self.decoder_inputs(tokens, C)
        tables = layout.tables(x.device)
        rope = self.rope.gather(tables.rope_pos)
        mask = cat_attention_mask(layout, self.args.attn_backend, x.device)
        for layer in self.layers:
            x = layer(x, rope, mask)  # (B, S, D)
        h = x.index_select(1, tables.out_index)  # (B, L, D): one output per input token
        return self.unpad(self.head(h, labels), labels, L0)  # (B, L0, V) or the loss

    def _init_params(self, init) -> None:
        std, _ = init_stds(self.args.dim, self.args.n_layers)
        self.compressor.init_weights(init)
        init.normal(self.cond.weight, std)
        if self.adaptive:
            init.normal(self.separator.weight, std)
        super()._init_params(init)
