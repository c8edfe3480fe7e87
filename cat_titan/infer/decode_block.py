"""The "lean" decode block: cuBLAS for every matmul, the rest folded into as few kernels as possible.

At batch 64 a decode step is a chain of ~140 small kernels; each costs its run time plus
about a microsecond of launch gap, and cuBLAS's skinny GEMMs beat every Triton GEMM tried
here (docs/benchmarks.md, sessions 11-14). So this path keeps cuBLAS for the four matmuls
of a block and removes the kernels between them:

* ``rope_attention``: one Triton kernel takes the raw ``wqkv`` output and does RoPE on q and
  k, the K/V cache writes and the decode attention (``decode_attention``'s kernel with a
  prologue): the separate RoPE and cache-write kernels are gone.
* ``residual_linear_``: ``x += a w^T`` as one cuBLAS call with beta = 1 (``addmm_`` into the
  residual stream), so no kernel adds the residual.
* With the norm weights folded into ``wqkv`` and ``w1|w3`` (``fold_norm_weight``; extra
  memory of those weights), an RMSNorm is only a per-row scale, and linearity lets it act
  after the matmul: ``rope_attention`` scales its q/k/v rows and ``swiglu_rows`` its gate and
  up rows, each from the residual row it reads itself. The two norm kernels are gone too.

Per block: ``norm, wqkv, rope_attention, wo+residual, norm, w1|w3, swiglu, w2+residual``
(8 kernels), or with folded norms ``wqkv, rope_attention, wo+residual, w1|w3, swiglu_rows,
w2+residual`` (6), against ~10 for the model's ops under inductor.

Measured (docs/benchmarks.md, session 18; H100, cat-150m, batch 64 x 2048, runner graphs):
+2% tokens/s unfolded, +4-5% with folded norms (+0.44 GiB); equal speed at batch 320. The
four cuBLAS GEMMs are then ~89% of a layer's kernel time. A bulk L2 prefetch of the next
GEMM's weight on a side stream was tried in a microbenchmark and made the chain 1.6x slower.

Off CUDA every function runs its reference (the model's arithmetic); the Triton kernels run
on CPU in Triton's interpreter in tests/infer/test_decode_block.py.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.common import apply_rope
from .decode_attention import reference_decode_attention

try:
    import triton
    import triton.language as tl

    from .decode_attention import attend_args, attend_visible
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None


def use_kernel(x: Tensor) -> bool:
    """Where the kernels run: CUDA tensors (tests route CPU tensors through Triton's interpreter)."""
    return x.is_cuda


# ----------------------------------------------------------------------------------------
# folded norms
# ----------------------------------------------------------------------------------------
def row_rsqrt(x: Tensor, eps: float) -> Tensor:
    """RMSNorm's row scale in float32: x (M, D) -> rsqrt(mean(x^2) + eps) (M, 1)."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def fold_norm_weight(w: Tensor, g: Tensor) -> Tensor:
    """w (N, K) with an RMSNorm weight g (K,) folded in: RMSNorm(x) w^T = r(x) * (x (w g)^T),
    r(x) the row scale. Rounded once to w's dtype (the unfolded path rounds x * g instead)."""
    return (w.float() * g.float()).to(w.dtype)


# ----------------------------------------------------------------------------------------
# RoPE + cache writes + attention
# ----------------------------------------------------------------------------------------
def reference_rope_attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor,
                             cols: Tensor, lengths: Tensor, T: int, G: int, x: Optional[Tensor] = None,
                             eps: float = 0.0) -> Tensor:
    """The definition. qkv (M, Hkv*(G+2)*hd), M = B*T rows (row m: query m % T of batch row
    m // T), per KV head [G query heads | k | v] as ``Attention.wqkv`` stores them; caches
    (B, Hkv, N, hd); cos/sin (M, hd); cols, lengths (M,): each row's cache column and visible
    length. Writes the rotated k and v at [m // T, :, cols[m]], then every query attends to
    columns [0, lengths[m]) (the step's own writes included) -> (M, G*Hkv*hd).
    x (M, D): the rows' residual stream, given when the norm weight is folded into wqkv: the
    projection is then scaled by RMSNorm's row scale of x first (in float32)."""
    M = qkv.shape[0]
    B, Hkv, _, hd = k_cache.shape
    if x is not None:
        qkv = (qkv.float() * row_rsqrt(x, eps)).to(qkv.dtype)
    q, k, v = qkv.view(M, Hkv, (G + 2) * hd).split([G * hd, hd, hd], dim=-1)  # per KV head
    rope = lambda t: apply_rope(t.transpose(0, 1), cos, sin).transpose(0, 1)  # (H, M, hd) against (M, hd) tables
    rows = torch.arange(M, device=qkv.device) // T
    k_cache[rows, :, cols] = rope(k)  # (M, Hkv, hd) into [b, :, col]
    v_cache[rows, :, cols] = v
    q = rope(q.reshape(M, Hkv * G, hd)).view(B, T, Hkv * G, hd).transpose(1, 2)  # (M, Hq, hd) -> (B, Hq, T, hd)
    y = reference_decode_attention(q, k_cache, v_cache, lengths.view(B, T))
    return y.transpose(1, 2).reshape(M, Hkv * G * hd)


def rope_attention_supports(qkv: Tensor, k_cache: Tensor, cos: Tensor, T: int, G: int) -> bool:
    """The kernel: rotary width = head dim, a power of two; G*T query rows per program <= 64."""
    hd = k_cache.shape[-1]
    return (triton is not None and hd in (16, 32, 64, 128) and cos.shape[-1] == hd and G * T <= 64
            and qkv.dtype == k_cache.dtype and qkv.dtype in (torch.bfloat16, torch.float16, torch.float32))


def rope_attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor, cols: Tensor,
                   lengths: Tensor, T: int, G: int, x: Optional[Tensor] = None, eps: float = 0.0) -> Tensor:
    """See ``reference_rope_attention``; one Triton kernel on CUDA."""
    if use_kernel(qkv) and rope_attention_supports(qkv, k_cache, cos, T, G):
        return torch.ops.cat_titan.rope_attention(qkv, k_cache, v_cache, cos.contiguous(), sin.contiguous(),
                                                  cols.contiguous(), lengths.contiguous(), x, float(eps), T, G)
    return reference_rope_attention(qkv, k_cache, v_cache, cos, sin, cols, lengths, T, G, x, eps)


# ----------------------------------------------------------------------------------------
# SwiGLU with the norm's row scale
# ----------------------------------------------------------------------------------------
def reference_swiglu_rows(gu: Tensor, h: Tensor, eps: float) -> Tensor:
    """silu(r a) * (r b) for gu = [a | b] (M, 2F), the w1|w3 projection of the residual rows h
    (M, D) with the ffn norm's weight folded in, r = RMSNorm's row scale of h -> (M, F)."""
    r = row_rsqrt(h, eps)
    a, b = gu.float().chunk(2, dim=-1)
    return (F.silu(a * r) * (b * r)).to(gu.dtype)


def swiglu_rows(gu: Tensor, h: Tensor, eps: float) -> Tensor:
    if use_kernel(gu) and triton is not None and gu.is_contiguous() and h.is_contiguous():
        return torch.ops.cat_titan.swiglu_rows(gu, h, float(eps))
    return reference_swiglu_rows(gu, h, eps)


# ----------------------------------------------------------------------------------------
# x += a w^T in the GEMM
# ----------------------------------------------------------------------------------------
@torch.library.custom_op("cat_titan::residual_linear_", mutates_args={"x"})
def residual_linear_(x: Tensor, a: Tensor, w: Tensor) -> None:
    """x (M, N) += a (M, K) @ w (N, K)^T, in place: one cuBLAS call with beta = 1 on CUDA. An
    opaque op, so inductor neither splits it into a matmul and an add nor copies x (the
    mutation is re-inplaced; tests/infer/test_decode_block.py checks the compiled code)."""
    x.addmm_(a, w.t())


@residual_linear_.register_fake
def _(x, a, w):
    return None


# ----------------------------------------------------------------------------------------
# the block
# ----------------------------------------------------------------------------------------
def lean_block_forward(layer: nn.Module, x: Tensor, attend: Callable[..., Tensor], gate_up: Tensor,
                       folded_qkv: Optional[Tensor] = None, folded_gate_up: Optional[Tensor] = None) -> Tensor:
    """``block_forward`` as cuBLAS matmuls around ``rope_attention`` (see the module
    docstring). x (B, T, D), contiguous and owned by the step: the residual stream is updated
    in place and returned. attend(qkv, x_rows or None) -> (BT, Hq*hd): the layer's
    ``rope_attention`` over its cache. folded_*: the weights with the norms' weights in them
    (``fold_norm_weight``), both or neither."""
    B, T, D = x.shape
    attn, ff = layer.attention, layer.feed_forward
    h = x.view(B * T, D)
    if folded_qkv is None:
        y = attend(F.linear(layer.attention_norm(h), attn.wqkv.weight), None)  # (BT, Hq*hd)
    else:
        y = attend(F.linear(h, folded_qkv), h)
    residual_linear_(h, y, attn.wo.weight)  # h += y wo^T
    if folded_gate_up is None:
        a, b = F.linear(layer.ffn_norm(h), gate_up).chunk(2, dim=-1)  # (BT, 2F) -> 2 x (BT, F)
        act = F.silu(a) * b
    else:
        act = swiglu_rows(F.linear(h, folded_gate_up), h, layer.ffn_norm.eps)
    residual_linear_(h, act, ff.w2.weight)  # h += act w2^T
    return x


# ----------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _rope_attention_kernel(QKV, X, Cos, Sin, K, V, Cols, Lens, Out, D, eps,
                               s_qkv, s_x, s_rope, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, s_out,
                               HKV: tl.constexpr, G: tl.constexpr, T: tl.constexpr, HD: tl.constexpr,
                               FOLD: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                               BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
                               SCALE: tl.constexpr):
        # One program per (batch row b, KV head h): the G*T queries that share its keys.
        pid = tl.program_id(0)
        b, h = pid // HKV, pid % HKV
        d = tl.arange(0, HD)
        half = HD // 2
        d_rot = (d + half) % HD  # rotate_half: out[d] = x[d] cos[d] + sign[d] x[d_rot] sin[d]
        sign = tl.where(d < half, -1.0, 1.0)
        head = QKV + h * (G + 2) * HD  # this KV head's [G q | k | v] in each row

        # k and v of the T queries: RoPE on k, then into the cache at each query's column.
        t = tl.arange(0, BLOCK_T)
        t_ok = t < T
        m_t = b * T + t  # (BLOCK_T,) rows of qkv
        if FOLD:
            ss = tl.zeros([BLOCK_T], tl.float32)
            for start in range(0, D, BLOCK_D):
                j = start + tl.arange(0, BLOCK_D)
                xv = tl.load(X + m_t[:, None] * s_x + j[None, :], mask=t_ok[:, None] & (j[None, :] < D),
                             other=0.0).to(tl.float32)
                ss += tl.sum(xv * xv, axis=1)
            r_t = tl.rsqrt(ss / D + eps)  # (BLOCK_T,)
        else:
            r_t = tl.full([BLOCK_T], 1.0, tl.float32)
        kv_mask = t_ok[:, None]
        row_t = head + m_t[:, None] * s_qkv
        k = tl.load(row_t + G * HD + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        k_rot = tl.load(row_t + G * HD + d_rot[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(row_t + (G + 1) * HD + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        if FOLD:  # rounded to the dtype as the unfolded projection's output is
            k = (k * r_t[:, None]).to(K.dtype.element_ty).to(tl.float32)
            k_rot = (k_rot * r_t[:, None]).to(K.dtype.element_ty).to(tl.float32)
            v = v * r_t[:, None]
        cos_t = tl.load(Cos + m_t[:, None] * s_rope + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        sin_t = tl.load(Sin + m_t[:, None] * s_rope + d[None, :], mask=kv_mask, other=0.0).to(tl.float32)
        k = k * cos_t + sign[None, :] * k_rot * sin_t
        col_t = tl.load(Cols + m_t, mask=t_ok, other=0)
        tl.store(K + b * sk_b + h * sk_h + col_t[:, None] * sk_n + d[None, :], k.to(K.dtype.element_ty),
                 mask=kv_mask)
        tl.store(V + b * sv_b + h * sv_h + col_t[:, None] * sv_n + d[None, :], v.to(V.dtype.element_ty),
                 mask=kv_mask)
        # The attention below reads those columns back: make the writes visible to every thread.
        tl.debug_barrier()

        # q: row r = query head h*G + r // T, query r % T.
        r = tl.arange(0, BLOCK_M)
        row_ok = r < G * T
        qj, qt = r // T, r % T
        m_q = b * T + qt
        q_ptr = head + m_q[:, None] * s_qkv + qj[:, None] * HD
        q = tl.load(q_ptr + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q_rot = tl.load(q_ptr + d_rot[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        if FOLD:
            r_q = tl.sum(tl.where(qt[:, None] == t[None, :], r_t[None, :], 0.0), axis=1)[:, None]  # (BLOCK_M, 1)
            q = (q * r_q).to(Out.dtype.element_ty).to(tl.float32)
            q_rot = (q_rot * r_q).to(Out.dtype.element_ty).to(tl.float32)
        cos_q = tl.load(Cos + m_q[:, None] * s_rope + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        sin_q = tl.load(Sin + m_q[:, None] * s_rope + d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32)
        q = (q * cos_q + sign[None, :] * q_rot * sin_q).to(K.dtype.element_ty)  # (BLOCK_M, HD)

        # Attention over each query's visible prefix (decode_attention's loop).
        n_vis = tl.load(Lens + m_q, mask=row_ok, other=1).to(tl.int32)  # padding rows see column 0
        acc, l_i = attend_visible(q, K + b * sk_b + h * sk_h, V + b * sv_b + h * sv_h, sk_n, 1, sv_n, 1, n_vis, d,
                                  BLOCK_M, BLOCK_N, HD, IEEE, SCALE)
        out = acc / l_i[:, None]
        tl.store(Out + m_q[:, None] * s_out + (h * G + qj)[:, None] * HD + d[None, :],
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])

    def launch_rope_attention(kernel, qkv: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor,
                              cols: Tensor, lengths: Tensor, x: Optional[Tensor], eps: float, T: int, G: int,
                              config: Optional[dict] = None) -> Tensor:
        M = qkv.shape[0]
        B, Hkv, N, hd = k_cache.shape
        out = torch.empty((M, Hkv * G * hd), dtype=qkv.dtype, device=qkv.device)
        D = x.shape[1] if x is not None else 1
        kernel[(B * Hkv,)](
            qkv, x if x is not None else qkv, cos, sin, k_cache, v_cache, cols, lengths, out, D, eps,
            qkv.stride(0), x.stride(0) if x is not None else 0, cos.stride(0),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0),
            HKV=Hkv, G=G, T=T, HD=hd, FOLD=x is not None, BLOCK_D=min(1024, triton.next_power_of_2(D)),
            BLOCK_T=max(2, triton.next_power_of_2(T)), **attend_args(qkv.dtype, hd, N, G * T, config))
        return out

    @torch.library.triton_op("cat_titan::rope_attention", mutates_args={"k_cache", "v_cache"})
    def _rope_attention_op(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor, cols: Tensor,
                           lengths: Tensor, x: Optional[Tensor], eps: float, T: int, G: int) -> Tensor:
        return launch_rope_attention(torch.library.wrap_triton(_rope_attention_kernel), qkv, k_cache, v_cache,
                                     cos, sin, cols, lengths, x, eps, T, G)

    @triton.jit
    def _swiglu_rows_kernel(GU, H, Out, F_, D, eps, s_gu, s_h, s_out,
                            BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr):
        # grid (rows, F blocks); each program recomputes its row's norm scale (D values from L2).
        m, pf = tl.program_id(0), tl.program_id(1)
        ss = tl.zeros([BLOCK_D], tl.float32)
        for start in range(0, D, BLOCK_D):
            j = start + tl.arange(0, BLOCK_D)
            hv = tl.load(H + m * s_h + j, mask=j < D, other=0.0).to(tl.float32)
            ss += hv * hv
        r = tl.rsqrt(tl.sum(ss, axis=0) / D + eps)
        f = pf * BLOCK_F + tl.arange(0, BLOCK_F)
        ok = f < F_
        a = tl.load(GU + m * s_gu + f, mask=ok, other=0.0).to(tl.float32) * r
        b = tl.load(GU + m * s_gu + F_ + f, mask=ok, other=0.0).to(tl.float32) * r
        tl.store(Out + m * s_out + f, (a * tl.sigmoid(a) * b).to(Out.dtype.element_ty), mask=ok)

    def launch_swiglu_rows(kernel, gu: Tensor, h: Tensor, eps: float, block_f: int = 1024) -> Tensor:
        M, F2 = gu.shape
        D = h.shape[1]
        out = torch.empty((M, F2 // 2), dtype=gu.dtype, device=gu.device)
        block_f = min(block_f, triton.next_power_of_2(F2 // 2))
        kernel[(M, triton.cdiv(F2 // 2, block_f))](
            gu, h, out, F2 // 2, D, eps, gu.stride(0), h.stride(0), out.stride(0),
            BLOCK_F=block_f, BLOCK_D=min(2048, triton.next_power_of_2(D)), num_warps=4)
        return out

    @torch.library.triton_op("cat_titan::swiglu_rows", mutates_args=())
    def _swiglu_rows_op(gu: Tensor, h: Tensor, eps: float) -> Tensor:
        return launch_swiglu_rows(torch.library.wrap_triton(_swiglu_rows_kernel), gu, h, eps)
