#!/usr/bin/env python
"""Time the attention kernels a CAT runs, in isolation, to see what the mask costs.

Training (forward + backward of one decoder attention call, bf16, compiled FlexAttention):
the CAT mask on cat_titan's layout (masks.py: table lookups vs. the arithmetic mask function;
sparse block sizes; decoder length as is vs. padded to a multiple of 128), against causal
attention of the same length (FlexAttention and SDPA) as the dense reference point.

Decoding (one query per row over a KV cache, bf16, compiled): SDPA with a boolean mask (what
the runners did), the same SDPA without a mask (lower bound for the kernel), and attention
written out as matmul + masked softmax + matmul, which inductor fuses.

    python tools/bench_attention.py [--batch 8 --seq 2048 --chunk 8 --heads 24 --head-dim 64]
    python tools/bench_attention.py --flex [--autotune]  # the CAT's flex call: default tiles vs kernel options
    python tools/bench_attention.py --decode-sweep   # cat_titan's decode kernel: tile/warp/stage settings
    python tools/bench_attention.py --decode-gemms   # the decode step's matmuls: cuBLAS, cuBLASLt
                                                     # (--autotune: max-autotune)
    python tools/bench_attention.py --compressor     # the compressor's attention: SDPA, matmuls, flex
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def timed(fn, iters: int = 20, warmup: int = 3) -> float:
    """Mean milliseconds per call (CUDA events)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def chunk_pairs(text: str) -> list[tuple[int, int]]:
    """'8:1,32:2' -> [(8, 1), (32, 2)]: chunk size and prefix positions, both positive."""
    try:
        pairs = [(int(c), int(pre)) for c, pre in (g.split(":") for g in text.split(","))]
    except ValueError:
        pairs = []
    if not pairs or min(min(pair) for pair in pairs) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: want positive chunk:prefix pairs, e.g. 8:1,32:2")
    return pairs


def compressor_rows(B, K, S, H, hd, device) -> list[dict]:
    """The compressor's attention: N = B*K chunks of S = prefix + C positions, bidirectional,
    forward + backward, compiled: SDPA, the model's form (two batched matmuls + softmax) and
    FlexAttention over the chunks side by side. Error: largest difference of the output and
    the three gradients from a float32 computation of the same bf16 inputs."""
    from cat_titan.models.common import short_attention

    rows = []
    N = B * K
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v, g = (torch.randn(N, H, S, hd, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def out_and_grads(fn, grad, *args):  # [out, dq, dk, dv] in float32
        out = fn(*args)
        return [out.detach().float(), *(t.float() for t in torch.autograd.grad(out, args, grad.to(out.dtype)))]

    exact = out_and_grads(F.scaled_dot_product_attention, g,
                          *(t.detach().float().requires_grad_() for t in (q, k, v)))
    for label, fn in [("sdpa", F.scaled_dot_product_attention), ("matmul + softmax", short_attention)]:
        f = torch.compile(fn, dynamic=False)
        ms = timed(lambda: f(q, k, v).backward(g))
        err = [float((a - b).abs().max()) for a, b in zip(out_and_grads(f, g, q, k, v), exact)]
        rows.append({"variant": f"compressor {label}", "N": N, "S": S, "ms_fwd_bwd": ms,
                     "max_err_out_dq_dk_dv": err})
        print(json.dumps(rows[-1]), flush=True)
    # cat_titan's Triton kernels (models/chunk_attention.py): the compiled op as the model
    # calls it, then the raw forward + backward launches at each warp count
    from cat_titan.models import chunk_attention as ca

    f = torch.compile(ca.chunk_attention, dynamic=False)
    ms = timed(lambda: f(q, k, v).backward(g))
    err = [float((a - b).abs().max()) for a, b in zip(out_and_grads(f, g, q, k, v), exact)]
    rows.append({"variant": "compressor triton kernel (default launch)", "N": N, "S": S, "ms_fwd_bwd": ms,
                 "launch": ca.launch_config(S, hd), "max_err_out_dq_dk_dv": err})
    print(json.dumps(rows[-1]), flush=True)
    for warps in (1, 2, 4, 8):
        cfg = {"num_warps": warps}

        def raw(cfg=cfg):  # the forward's output stands in for dO
            out = ca.launch_fwd(ca._chunk_attn_fwd_kernel, q, k, v, cfg)
            return ca.launch_bwd(ca._chunk_attn_bwd_kernel, q, k, v, out, cfg)

        ms = timed(raw)
        rows.append({"variant": f"compressor triton kernel, {warps} warps (raw launches)", "N": N, "S": S,
                     "ms_fwd_bwd": ms})
        print(json.dumps(rows[-1]), flush=True)
    # FlexAttention over each sequence's chunks side by side, (B, H, K*S, hd) views of the
    # (B, K*S, H, hd) projections, with a block-diagonal mask: the same function.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from cat_titan.models.common import flex_kernel_options

    def side_by_side(t):  # (B*K, H, S, hd) -> (B, H, K*S, hd), stored as (B, K*S, H, hd)
        return t.detach().view(B, K, H, S, hd).permute(0, 1, 3, 2, 4).reshape(B, K * S, H, hd).transpose(1, 2)

    def chunked(t):  # the inverse
        return t.transpose(1, 2).reshape(B, K, S, H, hd).permute(0, 1, 3, 2, 4).reshape(N, H, S, hd)

    fq, fk, fv = (side_by_side(t).requires_grad_() for t in (q, k, v))
    fg = side_by_side(g)
    bm = create_block_mask(lambda b, h, qi, ki: qi // S == ki // S, B=None, H=None, Q_LEN=K * S, KV_LEN=K * S,
                           device=device)
    compiled, opts = torch.compile(flex_attention, dynamic=False), flex_kernel_options(fq)

    def f(q, k, v):
        return compiled(q, k, v, block_mask=bm, kernel_options=opts)

    ms = timed(lambda: f(fq, fk, fv).backward(fg))
    err = [float((chunked(a) - b).abs().max()) for a, b in zip(out_and_grads(f, fg, fq, fk, fv), exact)]
    rows.append({"variant": "compressor flex, chunks side by side (block-diagonal mask)", "N": N, "S": S,
                 "ms_fwd_bwd": ms, "max_err_out_dq_dk_dv": err})
    print(json.dumps(rows[-1]), flush=True)
    return rows


def train_rows(B, L, C, H, hd, device) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from cat_titan.models.masks import CatLayout, cat_mask_mod, layout_mask_mod

    flex = torch.compile(flex_attention, dynamic=False)
    rows = []

    def run(label, S, mask_mod, sdpa_causal=False, pairs=None, block=128):
        q, k, v = (torch.randn(B, H, S, hd, device=device, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn(B, H, S, hd, device=device, dtype=torch.bfloat16)
        if sdpa_causal:
            def step():
                F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(g)
            density = None
        else:
            bm = None

            def step():
                flex(q, k, v, block_mask=bm).backward(g)
        try:  # an unsupported block size fails in create_block_mask or in the flex lowering
            if not sdpa_causal:
                bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=S, KV_LEN=S, device=device, BLOCK_SIZE=block)
                full = bm.full_kv_num_blocks.sum() if bm.full_kv_num_blocks is not None else 0
                density = float(bm.kv_num_blocks.sum() + full) / (bm.kv_num_blocks.shape[-1] ** 2)
            ms = timed(step)
        except Exception as e:
            rows.append({"variant": label, "error": repr(e)[:300]})
            print(json.dumps(rows[-1]), flush=True)
            return
        # useful work: 4 * pairs * hd FLOPs forward (QK^T and PV), x3.5 with backward
        row = {"variant": label, "S": S, "ms_fwd_bwd": ms, "block_density": density}
        if pairs is not None:
            row["useful_tflops"] = 3.5 * 4 * pairs * hd * B * H / ms / 1e9
        rows.append(row)
        print(json.dumps(row), flush=True)

    lay = CatLayout(L, C, False)
    pad = CatLayout(L, C, False, 128)
    tables = lay.tables(device)
    idx = torch.arange(lay.length, device=device)
    pairs = int(layout_mask_mod(lay)(None, None, idx[:, None], idx[None, :]).sum())
    run("cat mask, table lookups", lay.length, cat_mask_mod(tables), pairs=pairs)
    for block in (128, (128, 64), 64):
        run(f"cat mask, arithmetic, block {block}", lay.length, layout_mask_mod(lay), pairs=pairs, block=block)
    run("cat mask, arithmetic, padded to 128", pad.length, layout_mask_mod(pad), pairs=pairs)
    causal_pairs = lay.length * (lay.length + 1) // 2
    run("causal flex", lay.length, lambda b, h, q, kv: q >= kv, pairs=causal_pairs)
    run("causal sdpa", lay.length, None, sdpa_causal=True, pairs=causal_pairs)
    return rows


def flex_rows(B, L, H, hd, device, autotune: bool) -> list[dict]:
    """The CAT decoder's FlexAttention call as the model makes it (models/masks.py block
    mask), forward + backward, compiled: inductor's default tiles vs the model's kernel options
    (common.flex_kernel_options; outputs and gradients compared), and optionally inductor's
    autotuned configs, at the chunk sizes the presets train with."""
    from torch._dynamo import config as dynamo_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from cat_titan.models.common import flex_kernel_options
    from cat_titan.models.masks import CatLayout, layout_mask_mod

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)  # one graph per variant
    rows = []

    def run(label, lay, mask_mod, opts, mode=None, ref=None):
        f = torch.compile(flex_attention, dynamic=False, mode=mode)
        gen = torch.Generator(device=device).manual_seed(0)  # the same inputs for every variant
        q, k, v, g = (torch.randn(B, H, lay.length, hd, device=device, dtype=torch.bfloat16, generator=gen)
                      for _ in range(4))
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        bm = create_block_mask(mask_mod, B=None, H=None, Q_LEN=lay.length, KV_LEN=lay.length, device=device)
        ms = timed(lambda: f(q, k, v, block_mask=bm, kernel_options=opts).backward(g))
        q.grad = k.grad = v.grad = None
        out = f(q, k, v, block_mask=bm, kernel_options=opts)
        out.backward(g)
        res = [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]
        row = {"variant": label, "S": lay.length, "ms_fwd_bwd": ms}
        if ref is not None:
            row["max_diff_out_dq_dk_dv"] = [float((a - b).abs().max()) for a, b in zip(res, ref)]
        rows.append(row)
        print(json.dumps(row), flush=True)
        return res

    for C, sep in ((8, False), (4, True), (8, True), (16, True), (32, True)):
        lay = CatLayout(L, C, sep)
        tag = f"C{C}{' sep' if sep else ''}"
        ref = run(f"{tag}: mask function, inductor's default tiles", lay, layout_mask_mod(lay), None)
        opts = flex_kernel_options(torch.empty(1, 1, 1, hd, device=device))
        run(f"{tag}: mask function, the model's kernel options {opts}", lay, layout_mask_mod(lay), opts, ref=ref)
        if autotune:
            run(f"{tag}: mask function, max-autotune", lay, layout_mask_mod(lay), None,
                "max-autotune-no-cudagraphs", ref=ref)
        torch.cuda.empty_cache()
    return rows


def decode_rows(B, N, H, hd, device) -> list[dict]:
    rows = []
    q = torch.randn(B, H, 1, hd, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, N, hd, device=device, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.rand(B, 1, 1, N, device=device) < 0.9
    mask[..., 0] = True

    def sdpa_mask(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def sdpa_nomask(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v)

    def manual(q, k, v, mask):
        s = (q @ k.transpose(-1, -2)).float() * hd ** -0.5  # (B, H, 1, N)
        s = s.masked_fill(~mask, float("-inf"))
        return (s.softmax(-1).to(v.dtype) @ v)  # (B, H, 1, hd)

    def reduction(q, k, v, mask):  # one query: products and sums that inductor fuses (no GEMV)
        s = (q.float() * k.float()).sum(-1) * hd ** -0.5  # (B, H, N)
        s = s.masked_fill(~mask[:, :, 0], float("-inf"))
        p = s.softmax(-1)
        return (p[..., None] * v.float()).sum(-2, keepdim=True).to(v.dtype)  # (B, H, 1, hd)

    ref = manual(q, k, v, mask).float()
    for label, fn in [("sdpa, bool mask", sdpa_mask), ("sdpa, no mask", sdpa_nomask),
                      ("matmul + masked softmax", manual), ("products + sums", reduction)]:
        f = torch.compile(fn, dynamic=False)
        for _ in range(3):
            f(q, k, v, mask)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()  # replayed: kernel time without the host's call overhead
        with torch.cuda.graph(graph):
            for _ in range(50):
                f(q, k, v, mask)
        ms = timed(graph.replay, iters=5) / 50
        err = None if "no mask" in label else float((f(q, k, v, mask).float() - ref).abs().max())
        gbps = 2 * k.numel() * k.element_size() / ms / 1e6
        row = {"variant": label, "B": B, "N": N, "us": ms * 1e3, "kv_GBps": gbps, "max_err_vs_manual": err}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def graph_us(fn, calls: int = 50) -> float:
    """Microseconds per call of fn, replayed from one CUDA graph of ``calls`` calls."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay, iters=5) / calls * 1e3


# (label, batch, KV heads, query heads per KV head, head dim, cache columns, visible columns)
DECODE_SWEEP_SHAPES = [
    ("cat-150m C8, early", 64, 24, 1, 64, 266, 8),
    ("cat-150m C8, mid", 64, 24, 1, 64, 266, 137),
    ("cat-150m C8, end", 64, 24, 1, 64, 266, 264),
    ("cat-150m C32, mid", 64, 24, 1, 64, 97, 65),
    ("dense-150m, mid", 64, 12, 1, 64, 2056, 1028),
    ("dense-150m, end", 64, 12, 1, 64, 2056, 2050),
    ("cat-150m C32 b320, mid", 320, 24, 1, 64, 161, 97),
]


def decode_sweep_rows(device) -> list[dict]:
    """The decode kernel at each tile / warp / stage setting on the shapes generation meets
    (one query per row, every row seeing the same number of columns, as in aligned batches):
    microseconds per call and the bandwidth of the visible K/V it must read."""
    from cat_titan.infer.decode_attention import _decode_kernel, kernel_config, launch_decode_kernel

    rows = []
    for label, B, Hkv, G, hd, N, vis in DECODE_SWEEP_SHAPES:
        q = torch.randn(B, Hkv * G, 1, hd, device=device, dtype=torch.bfloat16)
        k, v = (torch.randn(B, Hkv, N, hd, device=device, dtype=torch.bfloat16) for _ in range(2))
        lengths = torch.full((B, 1), vis, device=device, dtype=torch.long)
        ref = None
        useful = 2 * B * Hkv * vis * hd * 2  # bytes of visible K and V
        for block_n in (32, 64, 128):
            for warps in (1, 2, 4):
                for stages in (1, 2, 3):
                    cfg = dict(BLOCK_N=block_n, num_warps=warps, num_stages=stages)
                    try:
                        out = launch_decode_kernel(_decode_kernel, q, k, v, lengths, cfg)
                        ref = out if ref is None else ref
                        us = graph_us(lambda: launch_decode_kernel(_decode_kernel, q, k, v, lengths, cfg))
                    except Exception as e:  # e.g. out of shared memory
                        rows.append({"shape": label, **cfg, "error": repr(e)[:200]})
                        continue
                    rows.append({"shape": label, **cfg, "us": us, "visible_kv_GBps": useful / us / 1e3,
                                 "max_diff": float((out.float() - ref.float()).abs().max()),
                                 "default": cfg == kernel_config(hd, N)})
        best = min((r for r in rows if r["shape"] == label and "us" in r), key=lambda r: r["us"])
        dflt = next(r for r in rows if r["shape"] == label and r.get("default"))
        print(json.dumps({"shape": label, "best": best, "default_us": dflt["us"]}), flush=True)
    return rows


# cat-150m's decode-step matmuls at batch 64: (name, in features, out features)
DECODE_GEMMS = [("wqkv", 1536, 4608), ("wo", 1536, 1536), ("w1 (or w3)", 1536, 4096), ("w1|w3 fused", 1536, 8192),
                ("w2", 4096, 1536), ("head", 1536, 32000), ("compressor wqkv", 768, 2304)]


def decode_gemm_rows(device, batch: int = 64, autotune: bool = False, cycle_bytes: int = 120 * 2**20) -> list[dict]:
    """The decode step's skinny matmuls (M = batch rows): F.linear through cuBLAS and through
    cuBLASLt (``torch.backends.cuda.preferred_blas_library``; the environment variable
    TORCH_BLAS_PREFER_CUBLASLT=1 makes the second the default), and with ``autotune`` inductor's
    max-autotune choice. Each timing cycles through copies of the weight totalling cycle_bytes
    (twice the 60 MB L2), as a decode step streams every weight from HBM once (session 4's
    table kept one weight in L2: lower bounds); the weight-bytes bandwidth says how far from
    streaming each is."""
    rows = []
    before = torch.backends.cuda.preferred_blas_library()
    for name, k, n in DECODE_GEMMS:
        copies = max(2, -(-cycle_bytes // (n * k * 2)))
        x = torch.randn(batch, k, device=device, dtype=torch.bfloat16)
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        chain = lambda f: graph_us(lambda: [f(x, w) for w in ws], calls=5) / copies
        row = {"gemm": name, "M": batch, "K": k, "N": n, "weight_copies": copies}
        try:
            for lib in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(lib)
                row[f"{lib}_us"] = chain(F.linear)
        finally:
            torch.backends.cuda.preferred_blas_library(before)
        if autotune:
            row["autotune_us"] = chain(torch.compile(lambda x, w: F.linear(x, w), mode="max-autotune-no-cudagraphs",
                                                     dynamic=False))
        for key in ("cublas", "cublaslt", "autotune"):
            if f"{key}_us" in row:
                row[f"{key}_weight_TBps"] = n * k * 2 / row[f"{key}_us"] / 1e6
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--decode", default="64x266,64x97,320x161",
                   help="decode shapes BATCHxCOLUMNS, comma-separated ('' to skip)")
    p.add_argument("--decode-sweep", action="store_true",
                   help="only time the decode kernel's tile/warp/stage settings on generation's shapes")
    p.add_argument("--decode-gemms", action="store_true",
                   help="only time the decode step's matmuls (cuBLAS, cuBLASLt; with --autotune also max-autotune) "
                        "at --decode-batch rows")
    p.add_argument("--decode-batch", type=int, default=64, help="rows of --decode-gemms (64)")
    p.add_argument("--flex", action="store_true",
                   help="only time the CAT decoder's FlexAttention call: default tiles vs the model's kernel options")
    p.add_argument("--autotune", action="store_true",
                   help="with --flex: also inductor's max-autotune flex configs; with --decode-gemms: its GEMM choice")
    p.add_argument("--compressor", action="store_true",
                   help="only time the compressor's attention forms at the chunk sizes the presets train with")
    p.add_argument("--compressor-chunks", type=chunk_pairs, default="8:1,4:2,8:2,16:2,32:2", metavar="C:P,...",
                   help="--compressor: chunk size : prefix positions, per row group (fixed CAT: prefix 1; adaptive: 2)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if not torch.cuda.is_available():
        p.error("needs a CUDA device")
    dev = torch.device("cuda")
    if a.flex:
        out = {"flex": flex_rows(a.batch, a.seq, a.heads, a.head_dim, dev, a.autotune)}
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
        return 0
    if a.compressor:  # B*K chunks of prefix + C positions, compressor heads = decoder heads / 2
        out = {"compressor": [r for C, pre in a.compressor_chunks
                              for r in compressor_rows(a.batch, a.seq // C, C + pre, a.heads // 2, a.head_dim, dev)]}
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
        return 0
    if a.decode_sweep or a.decode_gemms:
        out = {"decode_sweep": decode_sweep_rows(dev)} if a.decode_sweep else {}
        if a.decode_gemms:
            out["decode_gemms"] = decode_gemm_rows(dev, a.decode_batch, autotune=a.autotune)
        if a.json:
            a.json.write_text(json.dumps(out, indent=1))
        return 0
    out = {"train": train_rows(a.batch, a.seq, a.chunk, a.heads, a.head_dim, dev), "decode": []}
    out["compressor"] = compressor_rows(a.batch, a.seq // a.chunk, a.chunk + 1, a.heads // 2, a.head_dim, dev)
    for shape in filter(None, a.decode.split(",")):
        b, n = (int(x) for x in shape.split("x"))
        out["decode"] += decode_rows(b, n, a.heads, a.head_dim, dev)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
