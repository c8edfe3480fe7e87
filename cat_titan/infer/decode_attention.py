"""Decode attention over a KV cache whose visible columns form a per-query prefix.

Every cache the runners keep is *column-causal*: a query written at column c sees exactly
columns [0, c] (dense caches by position; CAT caches by the layout in runners.py). So one
decode step needs only each query's visible length, never a mask:

    decode_attention(q, k, v, lengths)
        q (B, Hq, T, hd), k/v (B, Hkv, N, hd), lengths (B, T) -> (B, Hq, T, hd)
        query (b, :, t) attends to columns [0, lengths[b, t]) (every length >= 1)

On CUDA a Triton kernel reads only the visible columns: one program per (row, KV head)
holds the G = Hq/Hkv query heads x T queries that share those keys, and streams K/V in
blocks up to its longest visible length with an online softmax (fp32 statistics). Why not
SDPA: with a boolean mask, PyTorch's decode kernels read all N columns plus the mask (on an
H200, ~45 us per layer at batch 64 x 24 heads for 266 columns, nearly independent of N),
while the visible columns of a CAT cache are on average about half of N. The kernel is a
``torch.library.triton_op``, so torch.compile inlines it and CUDA graphs capture it.

Elsewhere (CPU, head dims Triton cannot tile) the same function runs as SDPA with the
prefix mask built from the lengths. tests/infer/test_decode_attention.py checks the kernel
against it in Triton's interpreter on CPU (float32) and tests/infer/test_generate_cuda.py
on a GPU (bf16).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None

BLOCK_N = 64  # cache columns per inner step for head dims > 64 (see kernel_config)


def reference_decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    """SDPA with the prefix mask: the definition, and the path off CUDA."""
    cols = torch.arange(k.shape[2], device=k.device)
    mask = (cols < lengths[..., None])[:, None]  # (B, 1, T, N)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1])


def kernel_supports(q: Tensor, k: Tensor) -> bool:
    """Shapes and dtypes the Triton kernel takes (anything else uses the reference path)."""
    hd = q.shape[-1]
    G = q.shape[1] // k.shape[1]
    return (triton is not None and hd in (16, 32, 64, 128, 256) and G * q.shape[2] <= 128
            and q.dtype in (torch.bfloat16, torch.float16, torch.float32) and k.dtype == q.dtype)


def kernel_config(hd: int, n_cols: int) -> dict:
    """Tile and launch settings of the CUDA kernel for head dim hd over a cache of n_cols
    columns. One query per head leaves the tensor-core tiles mostly empty, so the kernel is
    bound by how fast one program streams its K/V: on an H200 (`tools/bench_attention.py
    --decode-sweep`, batch 64 and 320, 12-24 heads of 64) one warp with 32-column tiles was
    the fastest or within 10% of it at every length, up to 2.1x faster than Triton's defaults
    (4 warps, 64 columns) and never slower; a third pipeline stage pays only on long (dense)
    caches. Wider heads keep the defaults (not measured)."""
    if hd > 64:
        return dict(BLOCK_N=BLOCK_N, num_warps=4, num_stages=3)
    return dict(BLOCK_N=32, num_warps=1, num_stages=3 if n_cols > 512 else 2)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
    if q.is_cuda and kernel_supports(q, k):
        return torch.ops.cat_titan.decode_attention(q, k, v, lengths)
    return reference_decode_attention(q, k, v, lengths)


if triton is not None:

    @triton.jit
    def attend_visible(q, k_base, v_base, sk_n, sk_d, sv_n, sv_d, n_vis, d,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HD: tl.constexpr, IEEE: tl.constexpr,
                       SCALE: tl.constexpr):
        """Softmax attention of q (BLOCK_M, HD) over the columns [0, n_vis[r]) of one head's K/V,
        streamed in BLOCK_N-column blocks with an online softmax (fp32 statistics). Returns
        (acc, l): the output is acc / l[:, None]. Every n_vis >= 1 (column 0 is in every row's
        first block, so the running maximum is finite)."""
        n_max = tl.max(n_vis, axis=0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HD], tl.float32)
        for start in range(0, n_max, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            n_ok = n < n_max
            kb = tl.load(k_base + n[:, None] * sk_n + d[None, :] * sk_d, mask=n_ok[:, None], other=0.0)
            vb = tl.load(v_base + n[:, None] * sv_n + d[None, :] * sv_d, mask=n_ok[:, None], other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(kb), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(kb))
            s = tl.where(n[None, :] < n_vis[:, None], s * SCALE, float("-inf"))  # (BLOCK_M, BLOCK_N)
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            alpha = tl.exp(m_i - m_new)
            p = tl.exp(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if IEEE:
                pv = tl.dot(p, vb.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(vb.dtype), vb)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
        return acc, l_i

    @triton.jit
    def _decode_kernel(Q, K, V, Lens, Out,
                       sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                       sl_b, sl_t, so_b, so_h, so_t, so_d,
                       HKV: tl.constexpr, G: tl.constexpr, T: tl.constexpr, HD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                       SCALE: tl.constexpr):
        pid = tl.program_id(0)
        b, h = pid // HKV, pid % HKV
        r = tl.arange(0, BLOCK_M)  # row r = query head (h*G + r // T), query r % T
        row_ok = r < G * T
        qh, qt = h * G + r // T, r % T
        d = tl.arange(0, HD)
        q = tl.load(Q + b * sq_b + qh[:, None] * sq_h + qt[:, None] * sq_t + d[None, :] * sq_d,
                    mask=row_ok[:, None], other=0.0)  # (BLOCK_M, HD)
        # Padding rows see column 0 only, so every row's statistics stay finite.
        n_vis = tl.load(Lens + b * sl_b + qt * sl_t, mask=row_ok, other=1).to(tl.int32)  # (BLOCK_M,)
        acc, l_i = attend_visible(q, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, sk_n, sk_d, sv_n, sv_d,
                                  n_vis, d, BLOCK_M, BLOCK_N, HD, IEEE, SCALE)
        out = acc / l_i[:, None]
        tl.store(Out + b * so_b + qh[:, None] * so_h + qt[:, None] * so_t + d[None, :] * so_d,
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])

    def attend_args(dtype: torch.dtype, hd: int, n_cols: int, rows: int, config: Optional[dict] = None) -> dict:
        """The constexprs and launch settings of a kernel built on ``attend_visible``: the query
        tile (``rows`` query rows per program, padded to >= 16 for tl.dot), IEEE dots in fp32,
        the softmax scale, and ``kernel_config``'s tile with ``config`` (BLOCK_N, num_warps,
        num_stages) over it. SCALE is a constexpr: a float argument arrives as fp64 through
        torch.compile and would promote the softmax statistics to fp64."""
        return dict(BLOCK_M=max(16, triton.next_power_of_2(rows)), IEEE=dtype == torch.float32, SCALE=hd ** -0.5,
                    **dict(kernel_config(hd, n_cols), **(config or {})))

    def launch_decode_kernel(kernel, q: Tensor, k: Tensor, v: Tensor, lengths: Tensor,
                             config: Optional[dict] = None) -> Tensor:
        """Run ``kernel`` (``_decode_kernel``, or it wrapped for torch.compile); config:
        BLOCK_N, num_warps, num_stages (default: ``kernel_config``)."""
        B, Hq, T, hd = q.shape
        Hkv = k.shape[1]
        G = Hq // Hkv
        out = torch.empty((B, Hq, T, hd), dtype=q.dtype, device=q.device)
        kernel[(B * Hkv,)](
            q, k, v, lengths, out,
            *q.stride(), *k.stride(), *v.stride(), *lengths.stride(), *out.stride(),
            HKV=Hkv, G=G, T=T, HD=hd, **attend_args(q.dtype, hd, k.shape[2], G * T, config))
        return out

    @torch.library.triton_op("cat_titan::decode_attention", mutates_args=())
    def _decode_attention_op(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> Tensor:
        return launch_decode_kernel(torch.library.wrap_triton(_decode_kernel), q, k, v, lengths)
