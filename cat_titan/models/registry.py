"""Model presets by name, model construction, parameter and FLOP counts.

Presets follow the paper's recipe: a CAT that replaces a dense model of width d uses a
decoder of width 2d (heads doubled) and a compressor of width d with a quarter of the depth.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .args import ModelArgs
from .base import BaseModel
from .common import liger_available

_DEBUG = dict(vocab_size=257, block_size=256)


def _cat(dense_dim: int, layers: int, heads: int, chunk: int, kind: str = "cat", **kw) -> ModelArgs:
    return ModelArgs(kind=kind, dim=2 * dense_dim, n_layers=layers, n_heads=2 * heads,
                     compressor_dim=dense_dim, compressor_layers=max(1, layers // 4),
                     compressor_heads=heads, chunk_size=chunk, **kw)


PRESETS: dict[str, ModelArgs] = {
    # CPU-sized: a training step in well under a second on one core.
    "debug-dense": ModelArgs(kind="dense", dim=64, n_layers=2, n_heads=4, **_DEBUG),
    "debug-cat": ModelArgs(
        kind="cat", dim=128, n_layers=2, n_heads=4, compressor_dim=64, compressor_layers=1,
        compressor_heads=4, chunk_size=8, **_DEBUG),
    "debug-cat-adaptive": ModelArgs(kind="cat_adaptive", dim=128, n_layers=2, n_heads=4, compressor_dim=64,
                                    compressor_layers=1, compressor_heads=4, chunk_size=8, **_DEBUG),
    "debug-cat-layer": ModelArgs(kind="cat_layer", dim=64, n_layers=2, n_heads=4, chunk_size=8,
                                 layer_pattern=["cat"], **_DEBUG),
    "debug-hybrid": ModelArgs(kind="cat_layer", dim=64, n_layers=3, n_heads=4, chunk_size=8,
                              layer_pattern=["cat", "cat", "dense"], **_DEBUG),
    # GPU sizes (vocabulary 32000 as in the benchmarks; configs override it per tokenizer).
    "dense-150m": ModelArgs(kind="dense", dim=768, n_layers=12, n_heads=12, vocab_size=32000),
    "dense-350m": ModelArgs(kind="dense", dim=1024, n_layers=24, n_heads=16, vocab_size=32000),
    "dense-1b": ModelArgs(kind="dense", dim=2048, n_layers=20, n_heads=16, vocab_size=32000),
    "dense-1536x12": ModelArgs(kind="dense", dim=1536, n_layers=12, n_heads=24, vocab_size=32000),
    # The reference-sized CAT: decoder 1536x12 (24 heads), compressor 768x3 (12 heads), chunk 8.
    "cat-150m": _cat(768, 12, 12, 8, vocab_size=32000),
    "cat-350m": _cat(1024, 24, 16, 8, vocab_size=32000),
    "cat-1b": _cat(1024, 20, 16, 8, vocab_size=32000),
    "cat-adaptive-150m": _cat(768, 12, 12, 32, kind="cat_adaptive", vocab_size=32000),
    "cat-adaptive-350m": _cat(1024, 24, 16, 32, kind="cat_adaptive", vocab_size=32000),
    "cat-adaptive-1b": _cat(1024, 20, 16, 32, kind="cat_adaptive", vocab_size=32000),
    "hybrid-150m": ModelArgs(kind="cat_layer", dim=768, n_layers=12, n_heads=12, chunk_size=8,
                             layer_pattern=["cat", "cat", "dense"], vocab_size=32000),
}
PRESETS["cat-reference"] = PRESETS["cat-150m"]


def get_preset(name: str) -> ModelArgs:
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise KeyError(f"unknown model preset '{name}'{hint}; presets: {sorted(PRESETS)}")
    return PRESETS[name].replace()


def resolve_runtime(args: ModelArgs, device: torch.device | str) -> ModelArgs:
    """Pin 'auto' choices for the device: FlexAttention and liger kernels on CUDA."""
    cuda = torch.device(device).type == "cuda"
    backend = args.attn_backend if args.attn_backend != "auto" else ("flex" if cuda else "sdpa")
    fused = args.fused_ops
    if fused == "auto":
        fused = "on" if cuda and liger_available() else "off"
    elif fused == "on" and not liger_available():
        raise RuntimeError("model.fused_ops=on needs liger-kernel (pip install liger-kernel); "
                           "use model.fused_ops=off or auto")
    return args.replace(attn_backend=backend, fused_ops=fused)


def model_class(kind: str):
    from .cat import CAT
    from .cat_layer import CatLayerTransformer
    from .dense import DenseTransformer

    return {"dense": DenseTransformer, "cat": CAT, "cat_adaptive": CAT, "cat_layer": CatLayerTransformer}[kind]


def build_model(args: ModelArgs, device: torch.device | str = "cpu", *, seed: Optional[int] = 0,
                runtime_device: torch.device | str | None = None, decoder_pad_multiple: int = 1) -> BaseModel:
    """Build a model on ``device``. With device 'meta' nothing is allocated: parallelize,
    ``to_empty`` and ``init_weights`` afterwards. Otherwise weights are initialised from
    ``seed`` (None skips it, e.g. before loading a checkpoint)."""
    problems = args.validate()
    if problems:
        raise ValueError("invalid model arguments:\n  " + "\n  ".join(problems))
    args = resolve_runtime(args, runtime_device or device)
    with torch.device(device):
        kw = {} if args.kind == "dense" else {"decoder_pad_multiple": decoder_pad_multiple}
        model = model_class(args.kind)(args, **kw)
    if torch.device(device).type != "meta" and seed is not None:
        model.init_weights(seed)
    return model


# ----------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------
def _block_macs(dim: int, heads: int, kv_heads: int, ffn: int) -> int:
    hd = dim // heads
    return dim * (heads + 2 * kv_heads) * hd + heads * hd * dim + 3 * dim * ffn


def _cat_keys(K: int, C: int, sep: bool) -> int:
    """Attended (query, key) pairs of the CAT decoder mask over a sequence of K chunks."""
    # fx_k sees fx_0..k; sep_k sees fx_0..k + itself; token j of chunk k sees fx_0..k (+ sep_k) + j+1 tokens.
    total = 0
    for k in range(K + 1):
        prefix = k + 1
        total += prefix
        if sep:
            total += prefix + 1
        if k < K:
            total += C * (prefix + (1 if sep else 0)) + C * (C + 1) // 2
    return total


def flops_per_token(args: ModelArgs, seq_len: int, chunk_size: Optional[int] = None) -> float:
    """Training FLOPs per input token: 6 x (matmul MACs) + 12 x attention (q,k) pairs x width.

    Counts what the model computes: the compressor over its prefix tokens, the decoder over
    its K+1 (or 2K+2) extra positions, attention only over the pairs the mask allows
    (causal: L(L+1)/2), the output head; embeddings excluded.
    """
    a = args
    L = seq_len
    macs = a.dim * a.padded_vocab_size * L  # output head
    attn_pairs_width = 0
    if a.kind == "dense" or a.kind == "cat_layer":
        for kind in a.layer_kinds():
            if kind == "dense":
                macs += _block_macs(a.dim, a.n_heads, a.kv_heads, a.ffn_dim) * L
                attn_pairs_width += a.dim * L * (L + 1) // 2
            else:
                C = a.chunk_size
                K = math.ceil(L / C)
                S = K + 1 + L
                Dfx = a.fx_dim
                macs += (3 * a.dim * a.ffn_dim) * L  # MLP
                macs += (a.dim * Dfx) * L * 3  # compress (C*D*Dfx per chunk), expand, final_proj
                macs += 4 * Dfx * Dfx * S  # inner qkv + wo over the CAT sequence
                attn_pairs_width += Dfx * _cat_keys(K, C, False)
    else:
        C = chunk_size or a.chunk_size
        sep = a.kind == "cat_adaptive"
        K = math.ceil(L / C)
        S = (K + 1) * (2 if sep else 1) + L
        macs += _block_macs(a.dim, a.n_heads, a.kv_heads, a.ffn_dim) * a.n_layers * S
        n_pre = 2 if sep else 1
        Lc = K * (C + n_pre)
        macs += _block_macs(a.compressor_dim, a.compressor_heads, a.c_kv_heads, a.c_ffn_dim) \
            * a.compressor_layers * Lc
        macs += a.fx_dim * C * a.compressor_dim * K  # proj_fx
        attn_pairs_width += a.n_layers * a.dim * _cat_keys(K, C, sep)
        attn_pairs_width += a.compressor_layers * a.compressor_dim * K * (C + n_pre) ** 2
    return (6 * macs + 12 * attn_pairs_width) / L
