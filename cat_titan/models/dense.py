"""Transformer++ baseline: RMSNorm, SwiGLU, RoPE, grouped-query attention."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .args import ModelArgs
from .base import BaseModel, RopeBuffer
from .common import OutputHead, TransformerBlock


class DenseTransformer(BaseModel):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        fused = args.fused_ops == "on"
        self.tok_embeddings = nn.Embedding(args.padded_vocab_size, args.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(args.dim, args.n_heads, args.kv_heads, args.ffn_dim, qk_norm=args.qk_norm,
                             norm_eps=args.norm_eps, fused=fused)
            for _ in range(args.n_layers))
        self.head = OutputHead(args.dim, args.padded_vocab_size, args.norm_eps, fused)
        self.rope = RopeBuffer(args.dim // args.n_heads, args.block_size, args.rope_base)

    def forward(self, tokens: Tensor, labels: Optional[Tensor] = None, chunk_size: Optional[int] = None) -> Tensor:
        self.check_tokens(tokens)
        self.resolve_chunk_size(chunk_size)
        L0 = tokens.shape[1]
        tokens, labels = self.pad_sequence(tokens, labels, self.seq_pad_multiple)
        x = self.tok_embeddings(tokens)  # (B, L, D)
        rope = self.rope.first(tokens.shape[1])
        for layer in self.layers:
            x = layer(x, rope, None)
        return self.unpad(self.head(x, labels), labels, L0)  # (B, L0, V) or the loss
