"""One kernel per linear of a decode step: the RMSNorm before it, the matmul, and what comes
after it (SwiGLU, the residual add).

A decode step multiplies a few rows (the batch) by each weight. On an H200 at batch 64 each
cuBLAS GEMM takes 4-7 us however small its weight, and the norms, the SwiGLU product and the
residual adds between the GEMMs are kernels of their own (docs/benchmarks.md, session 4:
~60% of a CAT-32 step in 49 GEMMs, ~90 us in pointwise kernels, 132-149 kernels per step).
Here each linear of a block is one kernel:

    decode_linear(x, w, norm=None, residual=None, swiglu=False)
        x (M, K), w (N, K) -> (M, N)
        norm: an RMSNorm over K applied to x first
        swiglu: w is (2F, K) = [w1 | w3]; returns silu(x w1^T) * (x w3^T), (M, F)
        residual (M, N): returns residual + the result

    decode_qkv(x, wqkv, norm, k_cache, v_cache, cos, sin, cols, T, G) -> q
        the attention's projection with RoPE applied to q and k and the K/V written into the
        caches at each row's column, in the same kernel (one head per tile)

The norm costs no extra pass: RMSNorm(x) w^T = r * ((x * g) w^T) with the row scalar
r = rsqrt(mean(x^2) + eps), whose sum of squares accumulates while the matmul streams x.
Everything after the matmul is computed in fp32 and rounded once (the unfused path rounds
after the GEMM and after each pointwise op: results agree to bf16 rounding, not bitwise).

Split-K: with fewer output tiles than SMs (wo and w2 at batch 64: N = 1536) each tile's K
range is split over SPLIT_K programs. Each stores its fp32 partial in a workspace and bumps
the tile's counter in ``locks``; the last to arrive sums the partials in split order (the
result does not depend on which program came last), applies the epilogue, and resets the
counter to 0, so one zeroed ``locks`` buffer serves every call on a stream.

Stream-K (``PROGRAMS`` > 0 in the config): a fixed number of programs (e.g. one per SM) each
take an equal contiguous share of all (tile, K step) units, so the weight is streamed evenly
over the SMs whatever the tile count, and wide tiles (fewer re-reads of x) cost no idle SMs.
A tile cut between programs is summed by the last of them to arrive, as with split-K.

Tiles per shape: ``linear_config`` is a heuristic; ``tools/bench_attention.py --decode-linear
--write-config FILE`` times the alternatives on a GPU and writes each linear's fastest, which
``load_tuned_configs(FILE)`` (or the environment variable CAT_TITAN_DECODE_LINEAR_CONFIG, or
``bench_generate --linear-config FILE``) applies to those exact shapes.

PDL (``infer/pdl.py``, Hopper+, off by default): with a mode on, the CUDA calls go through
opaque custom ops (``decode_linear_pdl``, ``decode_qkv_pdl``) whose launches let the kernel
start while the previous one finishes; each program waits for it before touching anything but
its weight, which mode 'prefetch' asks L2 for first.

Off CUDA (and for shapes the kernel does not take) the same function runs the model's own
modules (``reference_decode_linear``), so a CPU runner computes exactly what the unfused
step does. tests/infer/test_decode_linear.py checks the kernel against it in Triton's
interpreter (float32) for every epilogue and split, and inside a generation.

Status (docs/benchmarks.md, session 11): correct on an H200 (the CUDA tests pass, split-K
included), but with ``linear_config``'s untuned tiles a batch-64 decode step is slower than
the default path (cuBLAS + inductor's pointwise kernels): 0.67x at chunk 8, 0.65x at 32. Off by
default until tuned tiles win.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import pdl

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None

LOCKS = 1024  # tile counters per runner: split-K is used only with fewer tiles than SMs


def row_rsqrt(x: Tensor, eps: float) -> Tensor:
    """RMSNorm's row scale in float32: x (M, D) -> rsqrt(mean(x^2) + eps) (M, 1)."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def row_scale(x: Tensor, eps: float) -> Tensor:
    """RMSNorm without its weight (that is in the folded weight, ``fold_norm_weight``):
    x * rsqrt(mean(x^2) + eps) in float32, cast back, as RMSNorm computes it."""
    return (x.float() * row_rsqrt(x, eps)).to(x.dtype)


def _normed(x: Tensor, norm: Optional[nn.Module], norm_in_w: bool) -> Tensor:
    if norm is None:
        return x
    return row_scale(x, norm.eps) if norm_in_w else norm(x)


def _norm_args(norm: Optional[nn.Module], norm_in_w: bool) -> tuple[Optional[Tensor], float, bool]:
    """The kernel's (g, eps, g_in_w) for a norm before the linear, or its weight folded in."""
    if norm is None:
        return None, 0.0, False
    return (None if norm_in_w else norm.weight), float(norm.eps), norm_in_w


def reference_decode_linear(x: Tensor, w: Tensor, norm: Optional[nn.Module] = None,
                            residual: Optional[Tensor] = None, swiglu: bool = False,
                            norm_in_w: bool = False) -> Tensor:
    """The definition, with the model's own norm module: what the unfused decode step computes.
    norm_in_w: w carries the norm's weight (``fold_norm_weight``); only its row scale is applied."""
    x = _normed(x, norm, norm_in_w)
    y = F.linear(x, w)
    if swiglu:
        a, b = y.chunk(2, dim=-1)  # (M, 2F) -> 2 x (M, F)
        y = F.silu(a) * b
    return y if residual is None else residual + y


def kernel_supports(x: Tensor, w: Tensor, norm: Optional[nn.Module]) -> bool:
    """2-D tensors of one float dtype. Not checked here: plain tensors, not DTensors (the
    runners enable the fused path only where ``fuse_gate_up`` found plain weights)."""
    if triton is None or x.dim() != 2 or w.dim() != 2:
        return False
    if norm is not None and norm.weight.dtype != x.dtype:
        return False  # e.g. an fp32 norm weight in a bf16 model: the module's own casts
    return x.dtype == w.dtype and x.dtype in (torch.bfloat16, torch.float16, torch.float32)


def use_kernel(x: Tensor) -> bool:
    """Where the kernel runs: CUDA tensors (tests route CPU tensors through Triton's interpreter)."""
    return x.is_cuda


def decode_linear(x: Tensor, w: Tensor, locks: Optional[Tensor], norm: Optional[nn.Module] = None,
                  residual: Optional[Tensor] = None, swiglu: bool = False, norm_in_w: bool = False) -> Tensor:
    """See the module docstring. locks: a zeroed int32 buffer of ``LOCKS`` counters on x's
    device (``make_locks``), owned by the caller and used only by its stream. norm_in_w: w is
    ``fold_norm_weight(weight, norm.weight)`` and only the norm's row scale is applied."""
    if locks is not None and use_kernel(x) and kernel_supports(x, w, norm):
        g, eps, folded = _norm_args(norm, norm_in_w)
        launch = pdl.launch_mode(x)
        if launch != "off":
            return torch.ops.cat_titan.decode_linear_pdl(x, w, g, residual, locks, eps, swiglu, folded, launch)
        return torch.ops.cat_titan.decode_linear(x, w, g, residual, locks, eps, swiglu, folded)
    return reference_decode_linear(x, w, norm, residual, swiglu, norm_in_w)


def reference_decode_qkv(x: Tensor, w: Tensor, norm: Optional[nn.Module], k_cache: Tensor, v_cache: Tensor,
                         cos: Tensor, sin: Tensor, cols: Tensor, T: int, G: int, norm_in_w: bool = False) -> Tensor:
    """The definition of ``decode_qkv`` with the model's ops (runners.project_qkv's arithmetic
    and KVCache.attend's writes, on rows instead of (batch, query) pairs)."""
    return rope_and_write_kv(F.linear(_normed(x, norm, norm_in_w), w), k_cache, v_cache, cos, sin, cols, T,
                             G).reshape(x.shape[0], -1)  # (M, Hq*hd)


def rope_and_write_kv(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, cos: Tensor, sin: Tensor, cols: Tensor,
                      T: int, G: int) -> Tensor:
    """The projection's rows qkv (M, Hkv*(G+2)*hd), per KV head [G q | k | v]: RoPE on k and q
    (cos/sin (M, hd)), k and v written at [m // T, :, cols[m]] of the caches (B, Hkv, N, hd);
    returns the rotated q (M, Hq, hd)."""
    from ..models.common import apply_rope

    M, hd = qkv.shape[0], k_cache.shape[-1]
    q, k, v = qkv.view(M, -1, (G + 2) * hd).split([G * hd, hd, hd], dim=-1)  # per KV head
    rope = lambda t: apply_rope(t.transpose(0, 1), cos, sin).transpose(0, 1)  # (H, M, hd) against (M, hd) tables
    rows = torch.arange(M, device=qkv.device) // T
    k_cache[rows, :, cols] = rope(k)  # (M, Hkv, hd) into [b, :, col]
    v_cache[rows, :, cols] = v
    return rope(q.reshape(M, -1, hd))  # (M, Hq, hd)


def qkv_kernel_supports(x: Tensor, k_cache: Tensor, cos: Tensor) -> bool:
    """The fused RoPE + cache epilogue: rotary width = head dim, a power of two Triton can
    tile (one head per tile), caches in x's dtype."""
    hd = k_cache.shape[-1]
    return hd in (16, 32, 64, 128, 256) and cos.shape[-1] == hd and k_cache.dtype == x.dtype


def decode_qkv(x: Tensor, w: Tensor, locks: Tensor, norm: Optional[nn.Module], k_cache: Tensor, v_cache: Tensor,
               cos: Tensor, sin: Tensor, cols: Tensor, T: int, G: int, norm_in_w: bool = False) -> Tensor:
    """Norm + the fused qkv projection + RoPE + the K/V cache writes as one kernel.

    x (M, D) with M = B * T (row m: query m % T of batch row m // T); w (Hkv * (G+2) * hd, D)
    in the model's per-KV-head layout (G query heads, then k, then v); caches (B, Hkv, N, hd);
    cos/sin (M, hd): each row's RoPE; cols (M,): each row's cache column. Writes k (rotated)
    and v at [m // T, :, cols[m]] and returns the rotated q (M, G * Hkv * hd)."""
    if use_kernel(x) and kernel_supports(x, w, norm) and qkv_kernel_supports(x, k_cache, cos):
        g, eps, folded = _norm_args(norm, norm_in_w)
        # the kernel reads the tables as dense (M, hd) rows and the columns as one per row
        args = (x, w, g, locks, k_cache, v_cache, cos.contiguous(), sin.contiguous(), cols.contiguous(), eps, T, G,
                folded)
        launch = pdl.launch_mode(x)
        if launch != "off":
            return torch.ops.cat_titan.decode_qkv_pdl(*args, launch)
        return torch.ops.cat_titan.decode_qkv(*args)
    return reference_decode_qkv(x, w, norm, k_cache, v_cache, cos, sin, cols, T, G, norm_in_w)


# (M, N, K, swiglu, qkv) -> tiles measured best on a GPU; see load_tuned_configs
TUNED: dict[tuple, dict] = {}
CONFIG_KEYS = ("BM", "BN", "BK", "SPLIT_K", "PROGRAMS", "num_warps", "num_stages")
TUNED_ENV = "CAT_TITAN_DECODE_LINEAR_CONFIG"


def load_tuned_configs(path: str | Path) -> int:
    """Tiles per linear shape from ``tools/bench_attention.py --decode-linear --write-config
    FILE`` (each linear's fastest setting on that GPU); they override ``linear_config`` for
    those exact shapes (M = batch rows). Returns how many shapes were loaded."""
    try:
        entries = json.loads(Path(path).read_text())["entries"]
        new = {(int(e["M"]), int(e["N"]), int(e["K"]), bool(e["swiglu"]), bool(e["qkv"])):
               {k: int(e["config"][k]) for k in CONFIG_KEYS if k in e["config"]} for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"decode_linear: cannot read tuned tiles from {path!s} ({e!r}); write the file with "
                         "tools/bench_attention.py --decode-linear --write-config FILE") from e
    TUNED.update(new)
    return len(new)


def resolve_config(M: int, N: int, K: int, swiglu: bool, sms: int, hd: Optional[int] = None,
                   config: Optional[dict] = None) -> dict:
    """The launch's settings: ``linear_config``'s heuristic, then a tuned entry for this exact
    shape, then ``config``; hd: the head dim of ``decode_qkv`` (one head per tile: BN = hd)."""
    base = linear_config(M, N, K, swiglu, sms) if hd is None else linear_config(M, N, K, swiglu, sms, BN=hd)
    cfg = {**base, **TUNED.get((M, N, K, swiglu, hd is not None), {}), **(config or {})}
    return cfg if hd is None else {**cfg, "BN": hd}


def fold_norm_weight(w: Tensor, g: Tensor) -> Tensor:
    """w (N, K) with an RMSNorm weight g (K,) folded in: RMSNorm(x) w^T = r(x) * (x (w g)^T),
    r(x) the row scale. Rounded once to w's dtype (the unfused path rounds x * g instead)."""
    return (w.float() * g.float()).to(w.dtype)


def make_locks(device) -> Tensor:
    return torch.zeros(LOCKS, dtype=torch.int32, device=device)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def linear_config(M: int, N: int, K: int, swiglu: bool, sms: int, BN: int = 32) -> dict:
    """Tiles and split for an (M, K) x (K, N) decode matmul: 16-64 rows per tile (the batch
    is small), BN output columns (32; 64 weight rows with swiglu; the head dim for
    ``decode_qkv``), 128-wide K steps, and a K split that brings the programs up to about one
    per SM. Not yet tuned on a GPU: ``tools/bench_attention.py --decode-linear`` times the
    alternatives."""
    BM = max(16, min(64, triton.next_power_of_2(M)))
    BK = 128
    tiles = triton.cdiv(M, BM) * triton.cdiv(N, BN)
    split = max(1, min(sms // tiles, K // (2 * BK), 8))
    return dict(BM=BM, BN=BN, BK=BK, SPLIT_K=split, PROGRAMS=0, num_warps=4, num_stages=3)


if triton is not None:

    @triton.jit
    def _dot(acc, x, w, IEEE: tl.constexpr):
        """acc + x (BM, BK) @ w (BN, BK)^T in fp32."""
        if IEEE:
            return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        return tl.dot(x, tl.trans(w), acc)

    @triton.jit
    def _rotate_half(x, BM: tl.constexpr, HD: tl.constexpr):
        """(BM, HD) -> [-x[:, HD/2:] | x[:, :HD/2]] (RoPE's partner features, sign folded in)."""
        halves = tl.permute(tl.reshape(x, [BM, 2, HD // 2]), (0, 2, 1))  # (BM, HD/2, 2)
        lo, hi = tl.split(halves)  # (BM, HD/2) each
        return tl.reshape(tl.permute(tl.join(-hi, lo), (0, 2, 1)), [BM, HD])

    @triton.jit
    def _epilogue(acc, acc3, ss, Res, Out, rm, rn, m_ok, n_ok, K, srm, srn, som, son,
                  Cos, Sin, Kc, Vc, Cols, skb, skh, skn, skd, pid_n, EPS: tl.constexpr,
                  NORM: tl.constexpr, RESID: tl.constexpr, SWIGLU: tl.constexpr,
                  QKV: tl.constexpr, GQ: tl.constexpr, T: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
        """Full-K accumulators (BM, BN) -> the norm's row scale, SwiGLU, residual; one rounding.
        QKV: the tile is one head of the fused projection (BN = head dim): RoPE on q and k
        heads; q heads to Out (M, Hq * hd), k and v into the caches at each row's column."""
        if NORM:
            r = 1.0 / tl.sqrt(ss / K + EPS)  # (BM,)
            acc = acc * r[:, None]
            acc3 = acc3 * r[:, None]
        if SWIGLU:
            acc = acc * tl.sigmoid(acc) * acc3  # silu(a) * b
        mask = m_ok[:, None] & n_ok[None, :]
        if RESID:
            acc += tl.load(Res + rm[:, None] * srm + rn[None, :] * srn, mask=mask, other=0.0).to(tl.float32)
        if QKV:
            kv_head, slot = pid_n // (GQ + 2), pid_n % (GQ + 2)  # per KV head: GQ q heads, k, v
            d = tl.arange(0, BN)
            if slot <= GQ:  # q or k: rotate (fp32 tables or not, the product is fp32)
                cos = tl.load(Cos + rm[:, None] * BN + d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
                sin = tl.load(Sin + rm[:, None] * BN + d[None, :], mask=m_ok[:, None], other=0.0).to(tl.float32)
                acc = acc * cos + _rotate_half(acc, BM, BN) * sin
            if slot < GQ:
                q_col = (kv_head * GQ + slot) * BN + d
                tl.store(Out + rm[:, None] * som + q_col[None, :] * son, acc.to(Out.dtype.element_ty),
                         mask=m_ok[:, None])
            else:
                col = tl.load(Cols + rm, mask=m_ok, other=0)  # (BM,) cache column of each row
                at = (rm // T) * skb + kv_head * skh + col * skn  # row m is query m % T of batch row m // T
                if slot == GQ:
                    tl.store(Kc + at[:, None] + d[None, :] * skd, acc.to(Kc.dtype.element_ty), mask=m_ok[:, None])
                else:
                    tl.store(Vc + at[:, None] + d[None, :] * skd, acc.to(Vc.dtype.element_ty), mask=m_ok[:, None])
        else:
            tl.store(Out + rm[:, None] * som + rn[None, :] * son, acc.to(Out.dtype.element_ty), mask=mask)

    @triton.jit
    def _accumulate(acc, acc3, ss, X, W, G, rm, rn, m_ok, n_ok, k_lo, k_hi, N, sxm, sxk, swn, swk,
                    NORM: tl.constexpr, SCALE_X: tl.constexpr, SWIGLU: tl.constexpr, BK: tl.constexpr,
                    IEEE: tl.constexpr):
        """K columns [k_lo, k_hi) of one (BM, BN) tile, BK at a time (a pipelined loop):
        acc += (x * g) w^T, acc3 the same with w3 (SWIGLU), ss += sum of x^2 per row (NORM).
        SCALE_X False: the norm weight is already in w (x goes to the dot as loaded)."""
        for k0 in range(k_lo, k_hi, BK):
            rk = k0 + tl.arange(0, BK)
            k_ok = rk < k_hi
            x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:
                xf = x.to(tl.float32)
                ss += tl.sum(xf * xf, axis=1)
                if SCALE_X:
                    g = tl.load(G + rk, mask=k_ok, other=0.0).to(tl.float32)
                    x = (xf * g[None, :]).to(W.dtype.element_ty)
            w_mask = n_ok[:, None] & k_ok[None, :]
            w = tl.load(W + rn[:, None] * swn + rk[None, :] * swk, mask=w_mask, other=0.0)  # (BN, BK)
            acc = _dot(acc, x, w, IEEE)
            if SWIGLU:  # rows N.. 2N of W: w3, for the same output columns
                w3 = tl.load(W + (rn + N)[:, None] * swn + rk[None, :] * swk, mask=w_mask, other=0.0)
                acc3 = _dot(acc3, x, w3, IEEE)
        return acc, acc3, ss

    @triton.jit
    def _l2_prefetch(ptrs, nbytes):
        """One bulk L2 prefetch per element (sm_90+): nbytes (a multiple of 16) from each
        16-byte-aligned pointer. The dummy result keeps the op; it is never read."""
        return tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                         [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _prefetch_weight(W, rn, N, k_lo, k_hi, swn, SWIGLU: tl.constexpr):
        """Ask L2 for weight rows rn (and their w3 rows) over columns [k_lo, k_hi): one bulk
        prefetch per row (rows are contiguous in K, checked by the launcher). Rows past N
        repeat the last row: never out of bounds."""
        rows = tl.minimum(rn, N - 1)
        nbytes = tl.zeros_like(rows) + (k_hi - k_lo) * (W.dtype.element_ty.primitive_bitwidth // 8)
        _l2_prefetch(W + rows * swn + k_lo, nbytes)
        if SWIGLU:
            _l2_prefetch(W + (rows + N) * swn + k_lo, nbytes)

    @triton.jit
    def _decode_linear_kernel(X, W, G, Res, Out, Work, SSWork, Locks, Cos, Sin, Kc, Vc, Cols,
                              M, N, K, K_SPLIT,
                              sxm, sxk, swn, swk, srm, srn, som, son, skb, skh, skn, skd,
                              EPS: tl.constexpr, NORM: tl.constexpr, SCALE_X: tl.constexpr, RESID: tl.constexpr,
                              SWIGLU: tl.constexpr, QKV: tl.constexpr, GQ: tl.constexpr, T: tl.constexpr,
                              SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                              IEEE: tl.constexpr, PDL: tl.constexpr, PREFETCH: tl.constexpr):
        pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_tiles = tl.num_programs(0)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros([BM, BN], tl.float32)
        acc3 = tl.zeros([BM, BN], tl.float32)  # w3's half (SWIGLU only; dead code otherwise)
        ss = tl.zeros([BM], tl.float32)  # sum of x^2 over this program's K range (NORM)
        k_lo = pid_s * K_SPLIT
        k_hi = tl.minimum(k_lo + K_SPLIT, K)
        if PDL > 0:  # infer/pdl.py (PDL = pdl.trigger(mode)): only the constant weight is touched before the wait
            if PREFETCH:
                _prefetch_weight(W, rn, N, k_lo, k_hi, swn, SWIGLU)
            tl.extra.cuda.gdc_wait()  # the previous kernel's writes (x, residual, counters) are visible
            if PDL == 1:
                tl.extra.cuda.gdc_launch_dependents()
        acc, acc3, ss = _accumulate(acc, acc3, ss, X, W, G, rm, rn, m_ok, n_ok, k_lo, k_hi, N, sxm, sxk, swn, swk,
                                    NORM, SCALE_X, SWIGLU, BK, IEEE)
        if PDL == 2:  # 'late': the weight is streamed; only the epilogue (or the partial's store) is left
            tl.extra.cuda.gdc_launch_dependents()
        if SPLIT_K == 1:
            _epilogue(acc, acc3, ss, Res, Out, rm, rn, m_ok, n_ok, K, srm, srn, som, son,
                      Cos, Sin, Kc, Vc, Cols, skb, skh, skn, skd, pid_n, EPS, NORM, RESID, SWIGLU, QKV, GQ, T, BM, BN)
        else:
            # Work: (SPLIT_K, 2 if SWIGLU else 1, M, N) fp32; SSWork: (SPLIT_K, n_tiles, M) fp32
            NACC: tl.constexpr = 2 if SWIGLU else 1
            mask = m_ok[:, None] & n_ok[None, :]
            part = Work + pid_s * NACC * M * N + rm[:, None] * N + rn[None, :]
            tl.store(part, acc, mask=mask)
            if SWIGLU:
                tl.store(part + M * N, acc3, mask=mask)
            if NORM:
                tl.store(SSWork + (pid_s * n_tiles + pid_n) * M + rm, ss, mask=m_ok)
            tl.debug_barrier()  # every thread's partial is written before the counter moves
            tile = pid_m * n_tiles + pid_n
            arrived = tl.atomic_add(Locks + tile, 1, sem="acq_rel")
            if arrived == SPLIT_K - 1:  # the last program of this tile sums the partials
                acc = tl.zeros([BM, BN], tl.float32)
                acc3 = tl.zeros([BM, BN], tl.float32)
                ss = tl.zeros([BM], tl.float32)
                for s in tl.static_range(SPLIT_K):  # split order: deterministic
                    src = Work + s * NACC * M * N + rm[:, None] * N + rn[None, :]
                    acc += tl.load(src, mask=mask, other=0.0, cache_modifier=".cg")
                    if SWIGLU:
                        acc3 += tl.load(src + M * N, mask=mask, other=0.0, cache_modifier=".cg")
                    if NORM:
                        ss += tl.load(SSWork + (s * n_tiles + pid_n) * M + rm, mask=m_ok, other=0.0,
                                      cache_modifier=".cg")
                _epilogue(acc, acc3, ss, Res, Out, rm, rn, m_ok, n_ok, K, srm, srn, som, son,
                          Cos, Sin, Kc, Vc, Cols, skb, skh, skn, skd, pid_n, EPS, NORM, RESID, SWIGLU, QKV, GQ, T,
                          BM, BN)
                tl.atomic_xchg(Locks + tile, 0)  # ready for the next call

    @triton.jit
    def _decode_linear_sk_kernel(X, W, G, Res, Out, Work, SSWork, Locks, Cos, Sin, Kc, Vc, Cols,
                                 M, N, K, KU, U,
                                 sxm, sxk, swn, swk, srm, srn, som, son, skb, skh, skn, skd,
                                 EPS: tl.constexpr, NORM: tl.constexpr, SCALE_X: tl.constexpr, RESID: tl.constexpr,
                                 SWIGLU: tl.constexpr, QKV: tl.constexpr, GQ: tl.constexpr, T: tl.constexpr,
                                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, IEEE: tl.constexpr,
                                 PDL: tl.constexpr, PREFETCH: tl.constexpr):
        """Stream-K: the U = tiles * KU units of work (one BK step of one (BM, BN) tile; tile t
        owns units [t KU, (t+1) KU)) are cut into P equal contiguous ranges, one per program,
        so every SM streams the same share of the weight whatever the tile count (split-K
        leaves e.g. 144 tiles on 132 SMs: two waves). A tile cut by a range boundary gets a
        partial from each program that touches it; the last to arrive sums them in program
        order and applies the epilogue. Program p's partials: Work[p, 0] for its first tile,
        Work[p, 1] for its last; the counter of a cut tile is its first program's (a program
        that starts a cut tile cannot start another), so P counters serve every call."""
        p = tl.program_id(0)
        P = tl.num_programs(0)
        n_tiles = tl.cdiv(N, BN)
        NACC: tl.constexpr = 2 if SWIGLU else 1
        u_lo = p * U // P
        u_hi = (p + 1) * U // P  # > u_lo: the launcher keeps P <= U
        i, j = tl.arange(0, BM), tl.arange(0, BN)
        tile_off = i[:, None] * BN + j[None, :]  # (BM, BN) in a partial's own layout
        if PDL > 0:  # as in _decode_linear_kernel
            if PREFETCH:
                for t in range(u_lo // KU, (u_hi - 1) // KU + 1):
                    k_lo = tl.maximum(u_lo - t * KU, 0) * BK
                    k_hi = tl.minimum(tl.minimum(u_hi - t * KU, KU) * BK, K)
                    _prefetch_weight(W, (t % n_tiles) * BN + j, N, k_lo, k_hi, swn, SWIGLU)
            tl.extra.cuda.gdc_wait()
            if PDL == 1:
                tl.extra.cuda.gdc_launch_dependents()
        for t in range(u_lo // KU, (u_hi - 1) // KU + 1):
            pid_m, pid_n = t // n_tiles, t % n_tiles
            rm, rn = pid_m * BM + i, pid_n * BN + j
            m_ok, n_ok = rm < M, rn < N
            ku_lo = tl.maximum(u_lo - t * KU, 0)
            ku_hi = tl.minimum(u_hi - t * KU, KU)
            acc = tl.zeros([BM, BN], tl.float32)
            acc3 = tl.zeros([BM, BN], tl.float32)
            ss = tl.zeros([BM], tl.float32)
            acc, acc3, ss = _accumulate(acc, acc3, ss, X, W, G, rm, rn, m_ok, n_ok, ku_lo * BK,
                                        tl.minimum(ku_hi * BK, K), N, sxm, sxk, swn, swk, NORM, SCALE_X, SWIGLU, BK,
                                        IEEE)
            if (ku_lo == 0) & (ku_hi == KU):  # the whole tile is this program's
                _epilogue(acc, acc3, ss, Res, Out, rm, rn, m_ok, n_ok, K, srm, srn, som, son,
                          Cos, Sin, Kc, Vc, Cols, skb, skh, skn, skd, pid_n, EPS, NORM, RESID, SWIGLU, QKV, GQ, T,
                          BM, BN)
            else:
                first = ((t * KU + 1) * P - 1) // U  # the program holding the tile's first unit
                last = ((t + 1) * KU * P - 1) // U  # ... and its last
                mine = p * 2 + tl.where(t == u_lo // KU, 0, 1)  # this tile's slot of this program's two
                part = Work + mine * NACC * BM * BN + tile_off
                tl.store(part, acc)
                if SWIGLU:
                    tl.store(part + BM * BN, acc3)
                if NORM:
                    tl.store(SSWork + mine * BM + i, ss)
                tl.debug_barrier()  # every thread's partial is written before the counter moves
                arrived = tl.atomic_add(Locks + first, 1, sem="acq_rel")
                if arrived == last - first:  # the last contributor sums the partials, in program order
                    acc = tl.zeros([BM, BN], tl.float32)
                    acc3 = tl.zeros([BM, BN], tl.float32)
                    ss = tl.zeros([BM], tl.float32)
                    for q in range(first, last + 1):
                        slot = q * 2 + tl.where(t == (q * U // P) // KU, 0, 1)  # t is q's first tile, or its last
                        src = Work + slot * NACC * BM * BN + tile_off
                        acc += tl.load(src, cache_modifier=".cg")
                        if SWIGLU:
                            acc3 += tl.load(src + BM * BN, cache_modifier=".cg")
                        if NORM:
                            ss += tl.load(SSWork + slot * BM + i, cache_modifier=".cg")
                    _epilogue(acc, acc3, ss, Res, Out, rm, rn, m_ok, n_ok, K, srm, srn, som, son,
                              Cos, Sin, Kc, Vc, Cols, skb, skh, skn, skd, pid_n, EPS, NORM, RESID, SWIGLU, QKV, GQ,
                              T, BM, BN)
                    tl.atomic_xchg(Locks + first, 0)  # ready for the next call
        if PDL == 2:  # 'late': a program's units span one or two tiles; its epilogues are short
            tl.extra.cuda.gdc_launch_dependents()

    def launch_decode_linear(x: Tensor, w: Tensor, g: Optional[Tensor], residual: Optional[Tensor],
                             locks: Tensor, eps: float, swiglu: bool, config: Optional[dict] = None,
                             qkv: Optional[tuple] = None, wrap=None, g_in_w: bool = False,
                             pdl_mode: str = "off") -> Tensor:
        """Run the kernel (``wrap``: e.g. ``torch.library.wrap_triton`` under torch.compile).
        config overrides ``linear_config``'s BM, BN, BK, SPLIT_K, PROGRAMS, num_warps, num_stages;
        PROGRAMS > 0 runs the stream-K kernel on that many programs (SPLIT_K is then unused).
        qkv: (k_cache, v_cache, cos, sin, cols, T, G) for the projection's RoPE + cache epilogue
        (see ``decode_qkv``); returns q (M, Hq * hd). g_in_w: w already carries the norm's
        weight (w * g over K, ``fold_norm_weight``): the kernel applies only the norm's row
        scale, so x goes to the tensor cores as loaded (session 12: ~75 fewer registers).
        pdl_mode: 'wait', 'prefetch' or 'late' launches with programmatic dependent launch (infer/pdl.py;
        not through ``wrap``: inductor's launcher drops launch attributes); 'prefetch' also
        prefetches each program's weight slice into L2 before the wait, where the weight's rows
        are contiguous and 16-byte aligned (otherwise it is 'wait')."""
        if pdl.check_mode(pdl_mode, "decode_linear") != "off" and wrap is not None:
            raise ValueError("decode_linear: a PDL launch cannot go through torch.compile's wrap_triton "
                             "(inductor launches user kernels without launch attributes); call it outside")
        launch = pdl.launch_args(pdl_mode, x, "decode_linear")
        M, K = x.shape
        N = w.shape[0] // 2 if swiglu else w.shape[0]
        sms = _sm_count(x.device.index or 0) if x.is_cuda else 8
        if qkv is not None:
            k_cache, v_cache, cos, sin, cols, T, G = qkv
        cfg = resolve_config(M, N, K, swiglu, sms, None if qkv is None else k_cache.shape[-1], config)
        BM, BN, BK = cfg["BM"], cfg["BN"], cfg["BK"]
        nacc = 2 if swiglu else 1
        tiles = triton.cdiv(N, BN) * triton.cdiv(M, BM)
        out = torch.empty((M, N // (G + 2) * G if qkv is not None else N), dtype=x.dtype, device=x.device)
        res = residual if residual is not None else out
        if qkv is None:  # unused pointers and strides
            k_cache = v_cache = cos = sin = cols = out
            T = G = 1
            cache_strides = (0, 0, 0, 0)
        else:
            cache_strides = k_cache.stride()
        if cfg.get("PROGRAMS", 0) > 0:
            KU = triton.cdiv(K, BK)
            programs = min(cfg["PROGRAMS"], tiles * KU)  # every program gets at least one unit
            if programs > locks.numel():
                raise ValueError(f"decode_linear: stream-K on {programs} programs needs as many counters; locks "
                                 f"has {locks.numel()} (use fewer programs, or a larger locks buffer)")
            work = torch.empty((programs, 2, nacc, BM, BN), dtype=torch.float32, device=x.device)
            ss_work = torch.empty((programs, 2, BM), dtype=torch.float32, device=x.device)
            kernel, grid, sizes, split_kw = _decode_linear_sk_kernel, (programs,), (KU, tiles * KU), {}
        else:
            k_split = triton.cdiv(triton.cdiv(K, cfg["SPLIT_K"]), BK) * BK  # each split: whole BK steps
            split = triton.cdiv(K, k_split)
            grid = (triton.cdiv(N, BN), split, triton.cdiv(M, BM))
            if split > 1 and tiles > locks.numel():
                raise ValueError(f"decode_linear: {tiles} tiles need as many counters; locks has "
                                 f"{locks.numel()} (use fewer tiles with split-K, or a larger locks buffer)")
            if split > 1:
                work = torch.empty((split, nacc, M, N), dtype=torch.float32, device=x.device)
                ss_work = torch.empty((split, grid[0], M), dtype=torch.float32, device=x.device)
            else:  # unused
                work = ss_work = out
            kernel, sizes, split_kw = _decode_linear_kernel, (k_split,), dict(SPLIT_K=split)
        # PDL and PREFETCH always passed: torch.compile's analysis of what the kernel writes
        # fails on a constexpr left to its default (and then clones every argument)
        launch["PREFETCH"] = pdl_mode == "prefetch" and _bulk_prefetchable(w, BK)
        (wrap or (lambda k: k))(kernel)[grid](
            x, w, g if g is not None else x, res, out, work, ss_work, locks, cos, sin, k_cache, v_cache, cols,
            M, N, K, *sizes,
            *x.stride(), *w.stride(), *res.stride(), *out.stride(), *cache_strides,
            # a constexpr: a float argument arrives as fp64 through torch.compile
            EPS=eps, NORM=g is not None or g_in_w, SCALE_X=not g_in_w, RESID=residual is not None, SWIGLU=swiglu,
            QKV=qkv is not None, GQ=G, T=T, **split_kw,
            BM=BM, BN=BN, BK=BK, IEEE=x.dtype == torch.float32,
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], **launch)
        return out

    def _bulk_prefetchable(w: Tensor, BK: int) -> bool:
        """_prefetch_weight's bulk copies need each row's byte range 16-byte aligned and a
        multiple of 16 long: contiguous rows, aligned start and row pitch, K and BK steps
        whole multiples of 16 bytes."""
        es = w.element_size()
        return (w.stride(1) == 1 and w.data_ptr() % 16 == 0 and (w.stride(0) * es) % 16 == 0
                and (w.shape[1] * es) % 16 == 0 and (BK * es) % 16 == 0)

    @torch.library.triton_op("cat_titan::decode_qkv", mutates_args={"locks", "k_cache", "v_cache"})
    def _decode_qkv_op(x: Tensor, w: Tensor, g: Optional[Tensor], locks: Tensor, k_cache: Tensor, v_cache: Tensor,
                       cos: Tensor, sin: Tensor, cols: Tensor, eps: float, T: int, G: int, g_in_w: bool) -> Tensor:
        return launch_decode_linear(x, w, g, None, locks, eps, False, qkv=(k_cache, v_cache, cos, sin, cols, T, G),
                                    wrap=torch.library.wrap_triton, g_in_w=g_in_w)

    @torch.library.triton_op("cat_titan::decode_linear", mutates_args={"locks"})
    def _decode_linear_op(x: Tensor, w: Tensor, g: Optional[Tensor], residual: Optional[Tensor],
                          locks: Tensor, eps: float, swiglu: bool, g_in_w: bool) -> Tensor:
        return launch_decode_linear(x, w, g, residual, locks, eps, swiglu, wrap=torch.library.wrap_triton,
                                    g_in_w=g_in_w)

    # PDL launches (infer/pdl.py): opaque to torch.compile, so the kernel is launched by
    # Triton's own launcher, which sets the launch attribute (inductor's would drop it).
    @torch.library.custom_op("cat_titan::decode_qkv_pdl", mutates_args={"locks", "k_cache", "v_cache"})
    def _decode_qkv_pdl_op(x: Tensor, w: Tensor, g: Optional[Tensor], locks: Tensor, k_cache: Tensor,
                           v_cache: Tensor, cos: Tensor, sin: Tensor, cols: Tensor, eps: float, T: int, G: int,
                           g_in_w: bool, pdl_mode: str) -> Tensor:
        return launch_decode_linear(x, w, g, None, locks, eps, False, qkv=(k_cache, v_cache, cos, sin, cols, T, G),
                                    g_in_w=g_in_w, pdl_mode=pdl_mode)

    @_decode_qkv_pdl_op.register_fake
    def _(x, w, g, locks, k_cache, v_cache, cos, sin, cols, eps, T, G, g_in_w, pdl_mode):
        return x.new_empty(x.shape[0], w.shape[0] // (G + 2) * G)  # q (M, Hq * hd)

    @torch.library.custom_op("cat_titan::decode_linear_pdl", mutates_args={"locks"})
    def _decode_linear_pdl_op(x: Tensor, w: Tensor, g: Optional[Tensor], residual: Optional[Tensor],
                              locks: Tensor, eps: float, swiglu: bool, g_in_w: bool, pdl_mode: str) -> Tensor:
        return launch_decode_linear(x, w, g, residual, locks, eps, swiglu, g_in_w=g_in_w, pdl_mode=pdl_mode)

    @_decode_linear_pdl_op.register_fake
    def _(x, w, g, residual, locks, eps, swiglu, g_in_w, pdl_mode):
        return x.new_empty(x.shape[0], w.shape[0] // 2 if swiglu else w.shape[0])


if os.environ.get(TUNED_ENV):  # e.g. tools/generate.py or a study run on a tuned GPU
    load_tuned_configs(os.environ[TUNED_ENV])
