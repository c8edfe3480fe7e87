"""Model arguments shared by every model kind.

One flat dataclass so that YAML configs and ``model.key=value`` overrides stay simple. The
decoder fields (``dim``, ``n_layers``, ...) describe the whole model for ``dense`` and
``cat_layer``; the ``compressor_*`` fields only matter for ``cat`` and ``cat_adaptive``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal, Optional

ModelKind = Literal["dense", "cat", "cat_adaptive", "cat_layer"]
LAYER_KINDS = ("cat", "dense")


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


def default_intermediate(dim: int) -> int:
    """SwiGLU width used by the reference (litgpt/gpt-fast convention)."""
    return find_multiple(int(2 * 4 * dim / 3), 256)


@dataclass
class ModelArgs:
    kind: ModelKind = "cat"
    """Model family: dense (Transformer++), cat (fixed chunk), cat_adaptive, cat_layer (CAT as the
    attention layer, optionally hybrid)."""
    vocab_size: int = 256
    """Tokenizer vocabulary size; the embedding and output are padded to a multiple of vocab_multiple."""
    vocab_multiple: int = 256
    """Padding multiple for the vocabulary (the reference pads to 256)."""
    block_size: int = 2048
    """Longest sequence the model accepts (the reference's block_size)."""

    dim: int = 256
    """Hidden size of the decoder (of the whole model for dense and cat_layer)."""
    n_layers: int = 4
    """Number of decoder blocks."""
    n_heads: int = 8
    """Attention heads of the decoder."""
    n_kv_heads: Optional[int] = None
    """Key/value heads of the decoder (grouped-query attention); None means n_heads."""
    intermediate_size: Optional[int] = None
    """SwiGLU hidden width of the decoder; None means the reference default for dim."""
    qk_norm: bool = False
    """RMSNorm on queries and keys (per head) before RoPE."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    rope_base: float = 10000.0
    """RoPE base frequency."""

    chunk_size: int = 8
    """Tokens per chunk for cat and cat_layer; the largest chunk size for cat_adaptive (a power of two)."""
    compressor_dim: int = 128
    """Hidden size of the compressor (cat, cat_adaptive)."""
    compressor_layers: int = 1
    """Blocks in the compressor (cat, cat_adaptive)."""
    compressor_heads: int = 4
    """Attention heads of the compressor."""
    compressor_kv_heads: Optional[int] = None
    """Key/value heads of the compressor; None means compressor_heads."""
    compressor_intermediate_size: Optional[int] = None
    """SwiGLU width of the compressor; None means the reference default for compressor_dim."""
    dim_fx: Optional[int] = None
    """Size of a compressed chunk. cat/cat_adaptive: must equal dim (None means dim). cat_layer: the
    inner attention width (None means 2*dim)."""

    layer_pattern: list[str] = field(default_factory=lambda: ["cat"])
    """cat_layer only: per-layer kinds ('cat' or 'dense'), repeated to n_layers, e.g. [cat, cat, dense]."""
    cat_layer_head_dim: int = 64
    """cat_layer only: head width of the CAT layer's inner attention (the reference uses 64)."""

    attn_backend: Literal["auto", "flex", "sdpa"] = "auto"
    """Attention for CAT masks: flex (FlexAttention block masks, CUDA), sdpa (dense mask; CPU and
    fallback); auto picks flex on CUDA."""
    fused_ops: Literal["auto", "on", "off"] = "auto"
    """liger-kernel fused RMSNorm/SwiGLU/RoPE/linear-cross-entropy: auto means on for CUDA when
    liger-kernel is importable."""

    # Fields that change parameter shapes or the computed function; resuming or loading
    # weights into a model that differs in any of them is refused.
    SHAPE_FIELDS = (
        "kind", "vocab_size", "vocab_multiple", "dim", "n_layers", "n_heads", "n_kv_heads",
        "intermediate_size", "qk_norm", "chunk_size", "compressor_dim", "compressor_layers",
        "compressor_heads", "compressor_kv_heads", "compressor_intermediate_size", "dim_fx",
        "layer_pattern", "cat_layer_head_dim", "block_size",
    )

    # ---- derived values -------------------------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        return find_multiple(self.vocab_size, self.vocab_multiple)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        return self.intermediate_size or default_intermediate(self.dim)

    @property
    def c_kv_heads(self) -> int:
        return self.compressor_kv_heads or self.compressor_heads

    @property
    def c_ffn_dim(self) -> int:
        return self.compressor_intermediate_size or default_intermediate(self.compressor_dim)

    @property
    def fx_dim(self) -> int:
        if self.dim_fx is not None:
            return self.dim_fx
        return 2 * self.dim if self.kind == "cat_layer" else self.dim

    @property
    def is_cat(self) -> bool:
        return self.kind in ("cat", "cat_adaptive")

    @property
    def chunk_sizes(self) -> tuple[int, ...]:
        """Chunk sizes a forward pass accepts."""
        if self.kind == "cat_adaptive":
            return tuple(2**p for p in range(int(math.log2(self.chunk_size)) + 1))
        if self.kind in ("cat", "cat_layer"):
            return (self.chunk_size,)
        return ()

    def layer_kinds(self) -> list[str]:
        if self.kind != "cat_layer":
            return ["dense"] * self.n_layers
        pat = self.layer_pattern
        return [pat[i % len(pat)] for i in range(self.n_layers)]

    def replace(self, **kw) -> "ModelArgs":
        return dataclasses.replace(self, **kw)

    def shape_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.SHAPE_FIELDS}

    def validate(self) -> list[str]:
        """Problems with these arguments, each naming the field (prefix 'model.')."""
        errs: list[str] = []

        positive = ["vocab_size", "vocab_multiple", "block_size", "dim", "n_layers", "n_heads", "chunk_size"]
        if self.is_cat:
            positive += ["compressor_dim", "compressor_layers", "compressor_heads"]
        if self.kind == "cat_layer":
            positive += ["cat_layer_head_dim"]
        for name in positive:
            if getattr(self, name) <= 0:
                errs.append(f"model.{name}={getattr(self, name)} must be positive")
        for name in ("n_kv_heads", "compressor_kv_heads", "intermediate_size", "compressor_intermediate_size",
                     "dim_fx"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                errs.append(f"model.{name}={getattr(self, name)} must be positive, or null for its default")
        if errs:  # the checks below divide by these
            return errs
        if self.dim % self.n_heads:
            errs.append(f"model.n_heads={self.n_heads} must divide model.dim={self.dim}")
        elif self.n_heads % self.kv_heads:
            errs.append(f"model.n_kv_heads={self.kv_heads} must divide model.n_heads={self.n_heads}")
        elif (self.dim // self.n_heads) % 2:  # RoPE rotates pairs of features
            errs.append(f"head dim model.dim/model.n_heads={self.dim // self.n_heads} must be even (RoPE)")
        if self.kind in ("cat", "cat_adaptive", "cat_layer"):
            if self.block_size % self.chunk_size:
                errs.append(f"model.chunk_size={self.chunk_size} must divide model.block_size={self.block_size}")
        if self.kind == "cat_adaptive" and self.chunk_size & (self.chunk_size - 1):
            errs.append(f"model.chunk_size={self.chunk_size} must be a power of two for cat_adaptive "
                        f"(it is the largest chunk size; e.g. 8, 16 or 32)")
        if self.is_cat:
            if self.compressor_dim % self.compressor_heads:
                errs.append(f"model.compressor_heads={self.compressor_heads} must divide "
                            f"model.compressor_dim={self.compressor_dim}")
            elif self.compressor_heads % self.c_kv_heads:
                errs.append(f"model.compressor_kv_heads={self.c_kv_heads} must divide "
                            f"model.compressor_heads={self.compressor_heads}")
            elif (self.compressor_dim // self.compressor_heads) % 2:
                errs.append(f"compressor head dim model.compressor_dim/model.compressor_heads="
                            f"{self.compressor_dim // self.compressor_heads} must be even (RoPE)")
            if self.fx_dim != self.dim:
                errs.append(f"model.dim_fx={self.dim_fx} must equal model.dim={self.dim} for {self.kind} "
                            f"(the compressed chunk is a decoder input); leave it unset")
        if self.kind == "cat_layer":
            bad = [k for k in self.layer_pattern if k not in LAYER_KINDS]
            if not self.layer_pattern or bad:
                errs.append(f"model.layer_pattern={self.layer_pattern} must be a non-empty list of {list(LAYER_KINDS)}")
            if self.fx_dim % self.cat_layer_head_dim:
                errs.append(f"model.cat_layer_head_dim={self.cat_layer_head_dim} must divide "
                            f"model.dim_fx={self.fx_dim}")
            if self.dim // self.n_heads > self.cat_layer_head_dim:
                errs.append(f"rotary width dim/n_heads={self.dim // self.n_heads} exceeds "
                            f"model.cat_layer_head_dim={self.cat_layer_head_dim}")
        return errs
