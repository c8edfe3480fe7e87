"""The experiments' CUDA library (libskinny_gemm.so, built from skinny_gemm.cu and ffn_fused.cu with
the command in skinny_gemm.cu's header) and TMA descriptors for its kernels. Exits with the reason
when there is no Hopper GPU or no library."""
import ctypes
import os
import sys

import torch
import torch.nn.functional as F

LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libskinny_gemm.so")
if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    sys.exit("the skinny_gemm experiments need a Hopper GPU (compute capability 9.0): "
             "the kernels use TMA, wgmma and thread-block clusters")
if not os.path.exists(LIB):
    sys.exit(f"{LIB} is missing: build it with the nvcc command in skinny_gemm.cu's header (CUDA 12.5 or newer)")
lib = ctypes.CDLL(LIB)


def tmap(t: torch.Tensor, box_rows: int) -> ctypes.Array:
    """A 128-byte TMA descriptor of the 2-D bf16 tensor t (unit column stride): (box_rows x 64)
    boxes, 128B swizzle, rows past the end read as zeros."""
    assert t.dtype == torch.bfloat16 and t.dim() == 2 and t.stride(1) == 1
    buf = ctypes.create_string_buffer(128)
    r = lib.sg_make_tmap(buf, ctypes.c_void_p(t.data_ptr()), ctypes.c_longlong(t.shape[0]),
                         ctypes.c_longlong(t.shape[1]), ctypes.c_longlong(t.stride(0)), ctypes.c_int(box_rows))
    assert r == 0, ("sg_make_tmap", r)
    return buf


def stream_ptr() -> ctypes.c_void_p:
    return ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)


CFGS = {0: "BN128x4", 1: "BN64x6", 2: "BN128x8", 3: "BN64x12", 4: "BN128x6", 5: "BN64x4"}  # sg_launch's cfg
BOX = {c: lib.sg_box_rows(c) for c in CFGS}  # weight rows per tile (BN)


class G:
    """One prepared launch: out (M, N) = / += x (M, K) @ w (N, K)^T (mode 0 / 1), or mode 2's
    SwiGLU of it (out (M, N/2)); cfg/S: tile config and split-K (cluster size)."""
    def __init__(self, x, w, out, mode, cfg, S, pdl, eps=1e-5):
        self.tw, self.tx = tmap(w, BOX[cfg]), tmap(x, 64)
        self.args = (cfg, self.tw, self.tx, ctypes.c_void_p(out.data_ptr()), mode, ctypes.c_float(eps),
                     x.shape[0], w.shape[0], w.shape[1], out.stride(0), S, pdl)
        self.keep = (x, w, out)

    def __call__(self):
        r = lib.sg_launch(*self.args, stream_ptr())
        assert r == 0, ("launch", r)


def chunk32_caches(B: int, L: int, device="cuda", dtype=torch.bfloat16):
    """L layers' K/V caches as the lean step meets them at chunk 32 mid-generation (cat-150m: 24 heads of
    64, 96 columns, 61 visible) and the step's rotary tables and columns for B rows:
    (k caches, v caches, cos, sin, cols, lengths)."""
    H, hd, N = 24, 64, 96
    ks = [torch.randn(B, H, N, hd, device=device, dtype=dtype) for _ in range(L)]
    vs = [torch.randn(B, H, N, hd, device=device, dtype=dtype) for _ in range(L)]
    ang = torch.rand(B, hd // 2, device=device) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)
    cols = torch.full((B,), 60, device=device, dtype=torch.long)
    return ks, vs, cos, sin, cols, cols + 1


def interleave(w1: torch.Tensor, w3: torch.Tensor, bn: int) -> torch.Tensor:
    """(F, D) x 2 -> (2F, D) in bn-row blocks [bn/2 rows of w1 | the same bn/2 units of w3]: the layout of
    skinny_gemm.cu's mode 2 (bn = its tile) and of ffn_fused.cu's phase A (bn = 16)."""
    F_, D_ = w1.shape
    hb = bn // 2
    return torch.stack([w1.view(F_ // hb, hb, D_), w3.view(F_ // hb, hb, D_)], 1).reshape(2 * F_, D_)


def swiglu_ref(h: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """fp32 SwiGLU of the RMSNorm'd rows h with the norm's weight folded into w1, w3:
    silu(r h w1^T) (r h w3^T), r = rsqrt(mean(h^2) + eps)."""
    r = torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)
    return F.silu((h.float() @ w1.float().t()) * r) * ((h.float() @ w3.float().t()) * r)
