"""Bidirectional attention inside short sequences (the compressor's chunks), one Triton
program per (sequence, KV head), forward and backward.

    chunk_attention(q, k, v)
        q (N, Hq, S, hd), k/v (N, Hkv, S, hd) -> (N, Hq, S, hd), unmasked, S <= 64

The compressor attends within each chunk of prefix + C positions: N = batch x chunks
sequences of S = 9 positions for the reference-sized CAT at chunk 8 (24,576 sequence-heads
per layer at batch 8). As batched matmuls (``common.short_attention``) that is six cuBLAS
calls and two softmax passes per layer, forward + backward, each over tiny 9 x 9 x 64
problems. A sequence's q, k, v and scores fit in one program's registers, so the whole
attention is one pass over q, k, v (forward) and one over q, k, v, dO (backward, which
recomputes the 9 x 9 scores instead of saving them).

Numerics: scores, softmax and every accumulation in fp32; P and dS are cast to the input
dtype before their matmuls, as flash attention does (float32 inputs use IEEE fp32 dots).
Off CUDA, and for shapes the kernel does not tile, ``common.short_attention`` is the path.
tests/models/test_chunk_attention.py checks the kernels in Triton's interpreter on CPU
against float64 autograd, and the compiled op on a GPU.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None

MAX_SEQ = 64  # the whole S x S score tile lives in registers
HEAD_DIMS = (16, 32, 64, 128)


def kernel_supports(q: Tensor, k: Tensor) -> bool:
    """CUDA tensors of shapes and dtypes the kernel takes; anything else uses the matmul form."""
    return (triton is not None and q.is_cuda and q.shape[-1] in HEAD_DIMS and q.shape[2] <= MAX_SEQ
            and q.shape[1] % k.shape[1] == 0 and q.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and k.dtype == q.dtype)


def launch_config(S: int, hd: int) -> dict:
    """Rows padded to a power of two >= 16 (tl.dot's smallest tile), one warp per 16 x 64
    tile elements. Forward + backward on an H100 (tools/bench_attention.py --compressor,
    hd 64, us for warps 1/2/4/8): S=9, N=2048: 122/134/153/262; S=6, N=4096: 166/195/265/477;
    S=34, N=512: 209/142/135/168."""
    block = max(16, 1 << (S - 1).bit_length())
    return {"BLOCK_S": block, "num_warps": max(1, min(8, block * hd // 1024))}


if triton is not None:

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        """a @ b in fp32; operands cast to b's dtype (fp32 operands: IEEE dots, not tf32)."""
        if IEEE:
            return tl.dot(a.to(tl.float32), b, input_precision="ieee")
        return tl.dot(a.to(b.dtype), b)

    @triton.jit
    def _tile(ptr, n, h, sn, sh, ss, sd, S: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr):
        """(BLOCK_S, HD) pointers and row mask of sequence n, head h."""
        r = tl.arange(0, BLOCK_S)
        d = tl.arange(0, HD)
        return ptr + n * sn + h * sh + r[:, None] * ss + d[None, :] * sd, (r < S)[:, None]

    @triton.jit
    def _probs(q, k, S: tl.constexpr, BLOCK_S: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr):
        """softmax(q k^T * SCALE) over the S real columns, fp32 (BLOCK_S, BLOCK_S)."""
        s = _mm(q, tl.trans(k), IEEE) * SCALE
        s = tl.where((tl.arange(0, BLOCK_S) < S)[None, :], s, float("-inf"))
        p = tl.exp(s - tl.max(s, axis=1)[:, None])  # padded rows (q = 0) are uniform, finite
        return p / tl.sum(p, axis=1)[:, None]

    @triton.jit
    def _chunk_attn_fwd_kernel(Q, K, V, O, sq_n, sq_h, sq_s, sq_d, sk_n, sk_h, sk_s, sk_d, sv_n, sv_h, sv_s,
                               sv_d, so_n, so_h, so_s, so_d, HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
                               HD: tl.constexpr, BLOCK_S: tl.constexpr, SCALE: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        n = (pid // HKV).to(tl.int64)  # N * S * H * hd may pass 2^31
        kvh = pid % HKV
        pk, rows = _tile(K, n, kvh, sk_n, sk_h, sk_s, sk_d, S, HD, BLOCK_S)
        pv, _ = _tile(V, n, kvh, sv_n, sv_h, sv_s, sv_d, S, HD, BLOCK_S)
        k = tl.load(pk, mask=rows, other=0.0)
        v = tl.load(pv, mask=rows, other=0.0)
        for j in tl.static_range(G):  # the query heads that share this KV head
            h = kvh * G + j
            pq, _ = _tile(Q, n, h, sq_n, sq_h, sq_s, sq_d, S, HD, BLOCK_S)
            p = _probs(tl.load(pq, mask=rows, other=0.0), k, S, BLOCK_S, SCALE, IEEE)
            o = _mm(p, v, IEEE)  # (BLOCK_S, HD)
            po, _ = _tile(O, n, h, so_n, so_h, so_s, so_d, S, HD, BLOCK_S)
            tl.store(po, o.to(O.dtype.element_ty), mask=rows)

    @triton.jit
    def _chunk_attn_bwd_kernel(Q, K, V, DO, DQ, DK, DV, sq_n, sq_h, sq_s, sq_d, sk_n, sk_h, sk_s, sk_d,
                               sv_n, sv_h, sv_s, sv_d, sdo_n, sdo_h, sdo_s, sdo_d, sdq_n, sdq_h, sdq_s, sdq_d,
                               sdk_n, sdk_h, sdk_s, sdk_d, sdv_n, sdv_h, sdv_s, sdv_d, HKV: tl.constexpr,
                               G: tl.constexpr, S: tl.constexpr, HD: tl.constexpr, BLOCK_S: tl.constexpr,
                               SCALE: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        n = (pid // HKV).to(tl.int64)
        kvh = pid % HKV
        pk, rows = _tile(K, n, kvh, sk_n, sk_h, sk_s, sk_d, S, HD, BLOCK_S)
        pv, _ = _tile(V, n, kvh, sv_n, sv_h, sv_s, sv_d, S, HD, BLOCK_S)
        k = tl.load(pk, mask=rows, other=0.0)
        v = tl.load(pv, mask=rows, other=0.0)
        dk = tl.zeros((BLOCK_S, HD), dtype=tl.float32)
        dv = tl.zeros((BLOCK_S, HD), dtype=tl.float32)
        for j in tl.static_range(G):
            h = kvh * G + j
            pq, _ = _tile(Q, n, h, sq_n, sq_h, sq_s, sq_d, S, HD, BLOCK_S)
            pdo, _ = _tile(DO, n, h, sdo_n, sdo_h, sdo_s, sdo_d, S, HD, BLOCK_S)
            q = tl.load(pq, mask=rows, other=0.0)
            do = tl.load(pdo, mask=rows, other=0.0)  # padded rows 0: they add nothing below
            p = _probs(q, k, S, BLOCK_S, SCALE, IEEE)
            dv += _mm(tl.trans(p), do, IEEE)
            dp = _mm(do, tl.trans(v), IEEE)  # (BLOCK_S, BLOCK_S)
            ds = p * (dp - tl.sum(p * dp, axis=1)[:, None]) * SCALE
            pdq, _ = _tile(DQ, n, h, sdq_n, sdq_h, sdq_s, sdq_d, S, HD, BLOCK_S)
            tl.store(pdq, _mm(ds, k, IEEE).to(DQ.dtype.element_ty), mask=rows)
            dk += _mm(tl.trans(ds), q, IEEE)
        pdk, _ = _tile(DK, n, kvh, sdk_n, sdk_h, sdk_s, sdk_d, S, HD, BLOCK_S)
        pdv, _ = _tile(DV, n, kvh, sdv_n, sdv_h, sdv_s, sdv_d, S, HD, BLOCK_S)
        tl.store(pdk, dk.to(DK.dtype.element_ty), mask=rows)
        tl.store(pdv, dv.to(DV.dtype.element_ty), mask=rows)

    def _consts(q: Tensor, k: Tensor, config: dict | None) -> tuple[tuple[int], dict]:
        N, Hq, S, hd = q.shape
        Hkv = k.shape[1]
        cfg = dict(launch_config(S, hd), **(config or {}))
        # SCALE is a constexpr: a float argument arrives as fp64 through torch.compile and
        # would promote the softmax to fp64
        return (N * Hkv,), dict(HKV=Hkv, G=Hq // Hkv, S=S, HD=hd, SCALE=hd ** -0.5,
                                IEEE=q.dtype == torch.float32, **cfg)

    def launch_fwd(kernel, q: Tensor, k: Tensor, v: Tensor, config: dict | None = None) -> Tensor:
        """Run the forward ``kernel`` (``_chunk_attn_fwd_kernel`` or it wrapped for torch.compile); config
        overrides launch_config (BLOCK_S, num_warps)."""
        N, Hq, S, hd = q.shape
        grid, consts = _consts(q, k, config)
        # (N, S, Hq, hd) storage: the caller's transpose back + reshape to (N, S, Hq*hd) is free
        out = torch.empty((N, S, Hq, hd), dtype=q.dtype, device=q.device).transpose(1, 2)
        kernel[grid](q, k, v, out, *q.stride(), *k.stride(), *v.stride(), *out.stride(), **consts)
        return out

    def launch_bwd(kernel, q: Tensor, k: Tensor, v: Tensor, do: Tensor,
                   config: dict | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Gradients of q, k, v for output gradient ``do``, each dense in its input's stride
        order (k and v are often gapped views of the qkv projection; their gradients need not be)."""
        grid, consts = _consts(q, k, config)
        dq, dk, dv = (torch.empty_like(t) for t in (q, k, v))
        kernel[grid](q, k, v, do, dq, dk, dv, *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
                     *dk.stride(), *dv.stride(), **consts)
        return dq, dk, dv

    @torch.library.triton_op("cat_titan::chunk_attention", mutates_args=())
    def _chunk_attention_op(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return launch_fwd(torch.library.wrap_triton(_chunk_attn_fwd_kernel), q, k, v)

    @torch.library.triton_op("cat_titan::chunk_attention_backward", mutates_args=())
    def _chunk_attention_backward_op(q: Tensor, k: Tensor, v: Tensor, do: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return launch_bwd(torch.library.wrap_triton(_chunk_attn_bwd_kernel), q, k, v, do)

    def _setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def _backward(ctx, do: Tensor):
        q, k, v = ctx.saved_tensors
        return _chunk_attention_backward_op(q, k, v, do)

    _chunk_attention_op.register_autograd(_backward, setup_context=_setup_context)


def chunk_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked attention of q (N, Hq, S, hd) over k/v (N, Hkv, S, hd); requires
    ``kernel_supports(q, k)``."""
    if not kernel_supports(q, k):
        raise ValueError(f"chunk_attention: no kernel for q {tuple(q.shape)} {q.dtype} on {q.device}, "
                         f"k {tuple(k.shape)} {k.dtype}: needs CUDA, S <= {MAX_SEQ}, head dim in {HEAD_DIMS}, "
                         "Hq a multiple of Hkv (use common.short_attention)")
    return _chunk_attention_op(q, k, v)
