"""Building blocks shared by every model: RMSNorm, RoPE, attention, SwiGLU, blocks, losses.

Model code is single-device: nothing here knows about meshes. Local shapes are inferred
from tensors (``view(b, s, -1, ...)``) so tensor-parallel shards run the same code.

Fused kernels (liger-kernel) are used when a module is built with ``fused=True`` (CUDA
only); the plain-PyTorch paths compute the same functions and are what CPU runs.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import chunk_attention
from .base import IGNORE_INDEX

AttnMask = Union[None, str, Tensor, "BlockMask"]  # noqa: F821  None: causal; "full": no mask; else flex/SDPA mask


# ----------------------------------------------------------------------------------------
# fused kernels (imported lazily: liger-kernel needs triton + CUDA)
# ----------------------------------------------------------------------------------------
def liger_available() -> bool:
    try:
        import liger_kernel  # noqa: F401
    except Exception:
        return False
    return True


def use_liger(fused: bool, x: Tensor) -> bool:
    """liger kernels run in eager mode only: inside a compiled block dynamo cannot trace
    their autograd Functions, and inductor fuses the plain ops into comparable kernels."""
    return fused and x.is_cuda and not torch.compiler.is_compiling()


def _liger():
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerRMSNormFunction, LigerRopeFunction, LigerSiLUMulFunction


# ----------------------------------------------------------------------------------------
# normalisation
# ----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as the reference does), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-5, fused: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        if use_liger(self.fused, x):
            rms_fn = _liger()[0]
            # "gemma" casting: everything in fp32, like the reference's plain RMSNorm.
            return rms_fn.apply(x, self.weight, self.eps, 0.0, "gemma", False)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * self.weight.float()).to(dtype)

    def init_weights(self, init) -> None:
        init.ones(self.weight)


# ----------------------------------------------------------------------------------------
# rotary position embeddings (litgpt layout: rotate halves of the first n_elem features)
# ----------------------------------------------------------------------------------------
def rope_table(n_elem: int, length: int, base: float, device=None) -> tuple[Tensor, Tensor]:
    """cos, sin of shape (length, n_elem), float32."""
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, device=device).float() / n_elem))
    pos = torch.arange(length, device=device).float()
    angles = torch.outer(pos, theta).repeat(1, 2)  # (length, n_elem)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, H, S, head_dim); cos/sin: (S, n_elem) with n_elem <= head_dim.

    Computed in float32 like the reference (its cos/sin are fp32 and promote the product).
    """
    n = cos.shape[-1]
    xr = x[..., :n]
    half = n // 2
    rotated = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = (xr * cos + rotated * sin).to(x.dtype)
    if n == x.shape[-1]:
        return out
    return torch.cat((out, x[..., n:]), dim=-1)


# ----------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------
_compiled_flex = None

# FlexAttention backward tiles for the CAT masks on Hopper at head dim 64: inductor's
# max-autotune picked these over its default (64/128/128/64, 3 stages, 8 warps). Forward +
# backward of the reference-sized decoder attention (batch 8, 24 heads, chunk 8) on an H200:
# 1.50 -> 1.33 ms, and 8-12% at the adaptive sizes 4..32 (tools/bench_attention.py --flex,
# docs/benchmarks.md). Nearly every tile of a CAT mask is partial; small tiles waste less.
HOPPER_FLEX_BWD = {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32,
                   "bwd_num_stages": 1, "bwd_num_warps": 4}


@torch.compiler.assume_constant_result
def _is_hopper(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) == (9, 0)


def flex_kernel_options(q: Tensor) -> Optional[dict]:
    """Kernel options for the shapes and devices they were measured on; None elsewhere."""
    if q.is_cuda and q.shape[-1] == 64 and _is_hopper(q.device.index or 0):
        return HOPPER_FLEX_BWD
    return None


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, enable_gqa: bool) -> Tensor:
    """FlexAttention, compiled once (eager flex materialises the full score matrix)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as _flex

    opts = flex_kernel_options(q)
    if torch.compiler.is_compiling():  # inside a compiled block: inductor lowers it
        return _flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa, kernel_options=opts)
    if _compiled_flex is None:
        # One graph per (shape, mask) is expected here (eager callers: generation, tests,
        # adaptive chunk sizes); the default recompile limit of 8 would fall back to the
        # eager flex, which materialises the full score matrix.
        from torch._dynamo import config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        _compiled_flex = torch.compile(_flex, dynamic=False)
    return _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa, kernel_options=opts)


SHORT_SEQ = 64


def short_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Unmasked attention over short sequences (the compressor's chunks: prefix + C
    positions) as two batched matmuls and a float32 softmax: the path off CUDA and for
    shapes chunk_attention's kernel does not take. Flash kernels pad every sequence to their
    64-128 wide tiles: for B*K chunks of 9 positions this form was 1.3x faster than SDPA,
    forward + backward, on an H200; the kernel is 7.8x faster again on an H100
    (tools/bench_attention.py --compressor)."""
    if k.shape[1] != q.shape[1]:  # grouped-query: each KV head serves q/kv query heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    s = (q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5  # (B, H, S, S)
    return s.softmax(-1).to(v.dtype) @ v  # (B, H, S, hd)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: AttnMask) -> Tensor:
    """q: (B, Hq, S, hd), k/v: (B, Hkv, S, hd) -> (B, Hq, S, hd)."""
    gqa = q.shape[1] != k.shape[1]
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if isinstance(mask, str):  # "full": bidirectional (the compressor)
        if chunk_attention.kernel_supports(q, k):
            return chunk_attention.chunk_attention(q, k, v)
        if q.shape[2] <= SHORT_SEQ:
            return short_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    if isinstance(mask, Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return flex_attention(q, k, v, mask, gqa)


class Attention(nn.Module):
    """Multi-head / grouped-query attention with a fused qkv projection.

    ``wqkv`` rows are stored per key/value group: for each KV head, its ``g`` query heads,
    then its key, then its value (``g = n_heads // n_kv_heads``). A column-wise TP shard of
    this weight therefore holds whole groups and the same forward runs on the shard. The
    reference stores [all q | all k | all v]; models/reference.py permutes between the two.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 qk_norm: bool = False, norm_eps: float = 1e-5, fused: bool = False):
        super().__init__()
        self.head_dim = head_dim
        self.group = n_heads // n_kv_heads
        self.fused = fused
        self.wqkv = nn.Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, dim, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, norm_eps, fused)
            self.k_norm = RMSNorm(head_dim, norm_eps, fused)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttnMask) -> Tensor:
        bsz, seqlen, _ = x.shape
        hd, g = self.head_dim, self.group
        qkv = self.wqkv(x).view(bsz, seqlen, -1, (g + 2) * hd)  # (B, S, Hkv, (g+2)*hd)
        q, k, v = qkv.split([g * hd, hd, hd], dim=-1)
        q = q.reshape(bsz, seqlen, -1, hd)  # (B, S, Hq, hd): head kv*g + j uses kv head kv
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
        cos, sin = rope
        if use_liger(self.fused, q):
            rope_fn = _liger()[1]
            # rotary width = cos width (may be < head_dim: the cat_layer quirk)
            q, k = rope_fn.apply(q.contiguous(), k.contiguous(), cos.unsqueeze(0), sin.unsqueeze(0))
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attend(q, k, v, mask)  # (B, Hq, S, hd)
        y = y.transpose(1, 2).reshape(bsz, seqlen, -1)  # (B, S, Hq*hd)
        return self.wo(y)

    def init_weights(self, init, std: float, out_std: float) -> None:
        init.normal(self.wqkv.weight, std)
        init.normal(self.wo.weight, out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.init_weights(init)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). Names: w1 = reference fc_1, w3 = fc_2, w2 = proj."""

    def __init__(self, dim: int, hidden: int, fused: bool = False):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        return self.gated(self.w1(x), self.w3(x))

    def gated(self, a: Tensor, b: Tensor) -> Tensor:
        """w2(silu(a) * b) for a = w1 x, b = w3 x (generation passes both from one GEMM, as
        strided halves of its output: liger's kernel flattens its inputs, so those take the
        plain ops)."""
        if use_liger(self.fused, a) and a.is_contiguous() and b.is_contiguous():
            return self.w2(_liger()[2].apply(a, b))
        return self.w2(F.silu(a) * b)

    def init_weights(self, init, std: float, out_std: float) -> None:
        init.normal(self.w1.weight, std)
        init.normal(self.w3.weight, std)
        init.normal(self.w2.weight, out_std)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)); h + ffn(norm(h))."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, ffn_dim: int, *, qk_norm: bool = False,
                 norm_eps: float = 1e-5, fused: bool = False, attention: Optional[nn.Module] = None):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps, fused)
        self.attention = attention or Attention(dim, n_heads, n_kv_heads, dim // n_heads, qk_norm,
                                                norm_eps, fused=fused)
        self.ffn_norm = RMSNorm(dim, norm_eps, fused)
        self.feed_forward = FeedForward(dim, ffn_dim, fused)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: AttnMask = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask)
        return h + self.feed_forward(self.ffn_norm(h))

    def init_weights(self, init, std: float, out_std: float) -> None:
        self.attention_norm.init_weights(init)
        self.ffn_norm.init_weights(init)
        self.attention.init_weights(init, std, out_std)
        self.feed_forward.init_weights(init, std, out_std)


# ----------------------------------------------------------------------------------------
# initialisation
# ----------------------------------------------------------------------------------------
def init_stds(dim: int, n_layers: int) -> tuple[float, float]:
    """GPT-NeoX small init (the reference's): std sqrt(2/(5 dim)); output projections
    1/(sqrt(dim) n_layers)."""
    return math.sqrt(2.0 / 5 / dim), 1.0 / math.sqrt(dim) / n_layers


# ----------------------------------------------------------------------------------------
# output head and loss
# ----------------------------------------------------------------------------------------
# The arguments of liger's cross-entropy kernel this module calls (liger-kernel 0.8.5). With
# another signature FusedLinearCrossEntropy falls back to liger's own chunked forward.
_LIGER_CE_ARGS = ("X_ptr", "X_stride", "Y_ptr", "Y_stride", "weight_ptr", "loss_ptr", "z_loss_ptr", "loss_stride",
                  "token_accuracy_ptr", "token_accuracy_stride", "predicted_tokens_ptr", "predicted_tokens_stride",
                  "n_cols", "n_non_ignore", "sum_non_ignore_weight", "weight_sum", "ignore_index", "lse_square_scale",
                  "label_smoothing", "reduction", "softcap", "RETURN_Z_LOSS", "RETURN_TOKEN_ACCURACY",
                  "RETURN_PREDICTED_TOKENS", "BLOCK_SIZE", "HAS_WEIGHT", "HAS_SOFTCAPPING", "HAS_GRADIENTS")


@functools.cache  # looked up once, not on every micro-step
def _liger_ce_kernel():
    """liger's in-place cross-entropy kernel (loss and d loss / d logits in one pass over a
    row of logits), or None if its signature is not the one this module was written for."""
    from liger_kernel.ops.cross_entropy import liger_cross_entropy_kernel as kernel

    return kernel if tuple(getattr(kernel, "arg_names", ())) == _LIGER_CE_ARGS else None


def _fused_ce_sum(h: Tensor, w: Tensor, labels: Tensor, ignore_index: int, kernel) -> tuple[Tensor, Tensor, Tensor]:
    """Summed cross-entropy of h @ w.T and its gradients, a chunk of rows at a time so that
    the logits held at once are about the size of h. liger's own loop first counts the
    non-ignored labels with ``.item()`` (a host sync per micro-step, seen in H200 traces:
    the host idles until the forward ends, then the GPU idles while it queues the loss);
    here the kernel sums (its count argument is unused for "sum") and the mean is taken on
    the device. h: (N, D), w: (V, D), labels: (N,) -> loss (N,) fp32, grad_h, grad_w."""
    import triton

    N, D = h.shape
    V = w.shape[0]
    chunk = min(N, triton.next_power_of_2(triton.cdiv(N, triton.cdiv(V, D))))
    loss = torch.zeros(N, dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h)
    grad_w = torch.zeros_like(w)
    logits_buf = torch.empty(chunk, V, dtype=h.dtype, device=h.device)
    block = min(65536 // 2, triton.next_power_of_2(V))  # liger's MAX_FUSED_SIZE
    for s in range(0, N, chunk):
        e = min(s + chunk, N)
        logits = logits_buf[:e - s]
        torch.mm(h[s:e], w.t(), out=logits)  # (c, V)
        y = labels[s:e].contiguous()
        kernel[(e - s,)](
            X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=y, Y_stride=y.stride(-1), weight_ptr=None,
            loss_ptr=loss[s:e], z_loss_ptr=None, loss_stride=1, token_accuracy_ptr=None, token_accuracy_stride=0,
            predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=V, n_non_ignore=1,
            sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=ignore_index, lse_square_scale=0.0,
            label_smoothing=0.0, reduction="sum", softcap=None, RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False,
            RETURN_PREDICTED_TOKENS=False, BLOCK_SIZE=block, HAS_WEIGHT=False, HAS_SOFTCAPPING=False,
            HAS_GRADIENTS=True, num_warps=32)  # logits now hold d loss / d logits
        torch.mm(logits, w, out=grad_h[s:e])  # (c, D)
        grad_w.addmm_(logits.t(), h[s:e])  # (V, D)
    return loss, grad_h, grad_w


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``h @ w.T`` computed in chunks that never hold the (tokens,
    vocab) logits, both gradients during forward (liger's kernel), with no host sync:
    the mean's count stays on the device (``_fused_ce_sum``), and backward scales the saved
    gradients by grad_output / count on the device (liger's backward tests
    ``grad_output == 1`` with torch.equal, another device->host copy).
    h: (N, D), w: (V, D), labels: (N,) -> () float32."""

    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
        kernel = _liger_ce_kernel()
        if kernel is None:  # another liger version: its own loop (syncs once per call)
            from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

            out = fused_linear_cross_entropy_forward(h, w, labels, ignore_index=ignore_index, reduction="mean")
            count = torch.ones((), device=h.device)
            ctx.save_for_backward(out[-3], out[-2], count)  # (loss, ..., grad_input, grad_weight, grad_bias)
            return out[0]
        loss, grad_h, grad_w = _fused_ce_sum(h, w, labels, ignore_index, kernel)
        count = (labels != ignore_index).sum().clamp(min=1).float()  # () on the device
        ctx.save_for_backward(grad_h, grad_w, count)
        return loss.sum() / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_out / count  # () float32; a 0-dim factor keeps the gradients' dtypes
        return (grad_h * scale if ctx.needs_input_grad[0] else None,
                grad_w * scale if ctx.needs_input_grad[1] and grad_w is not None else None,
                None, None)


class OutputHead(nn.Module):
    """Final norm + vocabulary projection, with an optional fused linear cross-entropy that
    never materialises the (tokens, vocab) logits."""

    def __init__(self, dim: int, vocab: int, norm_eps: float, fused: bool):
        super().__init__()
        self.norm = RMSNorm(dim, norm_eps, fused)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.fused = fused

    def forward(self, h: Tensor, labels: Optional[Tensor] = None, ignore_index: int = IGNORE_INDEX) -> Tensor:
        h = self.norm(h)
        if labels is None:
            return self.output(h)  # (B, L, V)
        if use_liger(self.fused, h):
            w = self.output.weight
            if torch.is_autocast_enabled(h.device.type):  # h is fp32 there (the fp32 residual stream)
                dtype = torch.get_autocast_dtype(h.device.type)
                h, w = h.to(dtype), w.to(dtype)
            return FusedLinearCrossEntropy.apply(h.reshape(-1, h.shape[-1]), w, labels.reshape(-1), ignore_index)
        logits = self.output(h).float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=ignore_index)
