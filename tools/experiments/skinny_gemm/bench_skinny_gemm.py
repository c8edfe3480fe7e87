"""EXPERIMENT (session 23, issue 7): skinny_gemm.cu against cuBLAS at the decode step's shapes
(cat-150m decoder, batch 64, bf16), on a Hopper GPU. Not used by cat_titan; results and what
they mean: docs/benchmarks.md, "Session 23". Build the library first (skinny_gemm.cu's header),
then, from the repository root: python tools/experiments/skinny_gemm/bench_skinny_gemm.py

1. correctness of every config / split / mode against fp32 products (ragged M included);
2. us per GEMM (12 distinct weights streamed from HBM in one CUDA graph), each config, with PDL;
3. the 49 GEMMs of a step as one dependent chain: cuBLAS, this kernel without and with PDL,
   and with SwiGLU in the w1|w3 epilogue, each checked (one eager run) against its reference;
4. the layers as the lean step runs them (folded norms): wqkv, cat_titan's rope_attention,
   wo + residual, w1|w3, swiglu_rows, w2 + residual, then the head: cuBLAS against this kernel.
Writes skinny_gemm.json to $OUT (or the working directory)."""
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "tools"), str(Path(__file__).resolve().parent)]
from bench_attention import graph_us  # noqa: E402  (us per call, replayed from one CUDA graph)
from cat_titan.infer.decode_block import rope_attention, swiglu_rows  # noqa: E402

# exits without a Hopper GPU or the library
from sglib import BOX, CFGS, G, chunk32_caches, interleave, swiglu_ref  # noqa: E402

dev, bf = "cuda", torch.bfloat16
torch.manual_seed(0)
def label(cfg, S):
    return f"{CFGS[cfg]}/S{S}"


print(torch.cuda.get_device_name(), torch.__version__, flush=True)
shapes = {"qkv": (4608, 1536), "wo": (1536, 1536), "gu": (8192, 1536), "w2": (1536, 4096), "head": (32000, 1536)}
SPL = {128: {"qkv": [2, 3, 4], "wo": [8], "gu": [1, 2], "w2": [8], "head": [1]},  # split-K tried, by BN
       64: {"qkv": [1, 2], "wo": [2, 4, 5], "gu": [1, 2], "w2": [2, 4, 5], "head": [1]}}

# 1. correctness
t0 = time.time()
worst = 0.0
for name, (N, K) in shapes.items():
    w = torch.randn(N, K, device=dev, dtype=bf) * 0.05
    for M in (64, 37):
        x = torch.randn(M, K, device=dev, dtype=bf)
        r0 = torch.randn(M, N, device=dev, dtype=bf)
        ref = x.float() @ w.float().t()
        cub = (F.linear(x, w).float() - ref).abs().max().item()
        for cfg in CFGS:
            for S in SPL[BOX[cfg]][name]:
                for mode in (0, 1):
                    out = r0.clone() if mode else torch.full((M, N), 7.0, device=dev, dtype=bf)
                    G(x, w, out, mode, cfg, S, 0)()
                    torch.cuda.synchronize()
                    want = ref + (r0.float() if mode else 0)
                    err = (out.float() - want).abs().max().item()
                    rel = err / want.abs().max().item()
                    worst = max(worst, rel)
                    if not (rel < 8e-3):
                        print(f"FAIL {name} M={M} {label(cfg, S)} mode={mode}: max err {err:.4g} (rel {rel:.3g});"
                              f" cuBLAS {cub:.4g}", flush=True)
                        sys.exit(1)
    print(f"ok {name}: cuBLAS max err {cub:.3g}", flush=True)
print(f"correctness: all pass, worst rel {worst:.3g} ({time.time() - t0:.0f} s)", flush=True)

bad2 = set()
for Fh_, D_ in ((4096, 1536), (256, 200)):
    w1 = torch.randn(Fh_, D_, device=dev, dtype=bf) * 0.05
    w3 = torch.randn(Fh_, D_, device=dev, dtype=bf) * 0.05
    for M in (64, 37):
        hh = torch.randn(M, D_, device=dev, dtype=bf) * 3
        want = swiglu_ref(hh, w1, w3)
        for cfg in CFGS:
            wi = interleave(w1, w3, BOX[cfg])
            for S in (1, 2, 3):
                out = torch.full((M, Fh_), 7.0, device=dev, dtype=bf)
                G(hh, wi, out, 2, cfg, S, 0)()
                torch.cuda.synchronize()
                rel = ((out.float() - want).abs().max() / want.abs().max()).item()
                if not rel < 8e-3:
                    print(f"FAIL swiglu F={Fh_} D={D_} M={M} {label(cfg, S)}: rel {rel:.3g}", flush=True)
                    bad2.add((cfg, S))
print(f"correctness: mode 2 (SwiGLU with the RMSNorm row scale in the epilogue): failing {sorted(bad2)}", flush=True)

# 2. per GEMM, with PDL: the fastest (cfg, S) of each shape
B, L = 64, 12
best = {}
res = {}
for name, (N, K) in shapes.items():
    n = 1 if name == "head" else L
    Ws = [torch.randn(N, K, device=dev, dtype=bf) * .02 for _ in range(n)]
    x = torch.randn(B, K, device=dev, dtype=bf)
    outs = [torch.empty(B, N, device=dev, dtype=bf) for _ in range(n)]
    row = {"cublas": graph_us(lambda: [F.linear(x, w) for w in Ws], calls=4) / n}
    for cfg in CFGS:
        for S in SPL[BOX[cfg]][name]:
            gs = [G(x, w, o, 0, cfg, S, 1) for w, o in zip(Ws, outs)]
            row[(cfg, S)] = graph_us(lambda: [g() for g in gs], calls=4) / n
    best[name] = min((k for k in row if k != "cublas"), key=row.get)
    mb = N * K * 2 / 1e6
    res[name] = {k if k == "cublas" else label(*k): round(v, 2) for k, v in sorted(row.items(), key=lambda kv: kv[1])}
    print(f"{name} ({mb:.1f} MB): cuBLAS {row['cublas']:.2f} us ({mb / row['cublas']:.2f} TB/s); best "
          f"{label(*best[name])} {row[best[name]]:.2f} us ({mb / row[best[name]]:.2f} TB/s)", flush=True)
    print("   ", json.dumps(res[name]), flush=True)
    Ws = outs = None  # free before the next shape
    torch.cuda.empty_cache()

# 3, 4. a decode step's GEMMs: back to back (3), or with the lean step's Triton kernels between them (4:
# folded norms, rope_attention over a chunk-32 cache mid-generation, swiglu_rows); then the head
D, Fh, V = 1536, 4096, 32000
Wl = [[torch.randn(3 * D, D, device=dev, dtype=bf) * .02, torch.randn(D, D, device=dev, dtype=bf) * .02,
       torch.randn(2 * Fh, D, device=dev, dtype=bf) * .02, torch.randn(D, Fh, device=dev, dtype=bf) * .02]
      for _ in range(L)]
Wh = torch.randn(V, D, device=dev, dtype=bf) * .02
h0 = torch.randn(B, D, device=dev, dtype=bf)
h = h0.clone()
qkv = torch.empty(B, 3 * D, device=dev, dtype=bf)
gu = torch.empty(B, 2 * Fh, device=dev, dtype=bf)
act = torch.empty(B, Fh, device=dev, dtype=bf)
logits = torch.empty(B, V, device=dev, dtype=bf)
FUSED = best["gu"] if best["gu"] not in bad2 else (0, 2)
print("fused w1|w3 config", label(*FUSED), flush=True)
W13 = [interleave(wgu[:Fh], wgu[Fh:], BOX[FUSED[0]]) for _, _, wgu, _ in Wl]
kcs, vcs, cos, sin, cols, lens = chunk32_caches(B, L)
eps = 1e-5


def attention(l):
    return rope_attention(qkv, kcs[l], vcs[l], cos, sin, cols, lens, 1, 1, h, eps)  # (B, D), new each call


def cublas_step(between, swiglu):
    """between: the Triton kernels sit between the GEMMs; else wo reads qkv[:, :D] and w2 reads
    gu[:, :Fh], or (swiglu) the fp32 SwiGLU reference of the w1|w3 projection."""
    def run():
        for l, (wq, wo, wgu, w2) in enumerate(Wl):
            torch.mm(h, wq.t(), out=qkv)
            h.addmm_(attention(l) if between else qkv[:, :D], wo.t())
            if swiglu and not between:
                h.addmm_(swiglu_ref(h, wgu[:Fh], wgu[Fh:]).to(bf), w2.t())
                continue
            torch.mm(h, wgu.t(), out=gu)
            h.addmm_(swiglu_rows(gu, h, eps) if between else gu[:, :Fh], w2.t())
        torch.mm(h, Wh.t(), out=logits)
    return run


def sg_step(between, fused, pdl):
    """cublas_step's GEMMs on this kernel at each shape's best config; fused: mode 2 on the
    interleaved w1|w3 writes act, which w2 reads (no swiglu kernel)."""
    cw, sw = best["w2"]
    gq = [G(h, wq, qkv, 0, *best["qkv"], pdl) for wq, _, _, _ in Wl]
    gwo = [G(qkv[:, :D], wo, h, 1, *best["wo"], pdl) for _, wo, _, _ in Wl]
    ggu = [G(h, w13, act, 2, *FUSED, pdl) if fused else G(h, wgu, gu, 0, *best["gu"], pdl)
           for (_, _, wgu, _), w13 in zip(Wl, W13)]
    gw2 = [G(act if fused else gu[:, :Fh], w2, h, 1, cw, sw, pdl) for _, _, _, w2 in Wl]
    ghead = G(h, Wh, logits, 0, *best["head"], pdl)

    def run():
        for l, (_, wo, _, w2) in enumerate(Wl):
            gq[l]()
            if between:  # the attention's output is new each call: its map is made here (at capture)
                G(attention(l), wo, h, 1, *best["wo"], pdl)()
            else:
                gwo[l]()
            ggu[l]()
            if between and not fused:
                G(swiglu_rows(gu, h, eps), w2, h, 1, cw, sw, pdl)()
            else:
                gw2[l]()
        ghead()
    return run


def check_and_time(fn, want):
    """us per step (CUDA graph), and the logits' max error from h0, relative to want's largest."""
    h.copy_(h0)
    fn()
    torch.cuda.synchronize()
    err = (logits.float() - want).abs().max().item() / want.abs().max().item()
    return {"us": round(graph_us(fn, calls=4), 1), "rel_err_vs_reference": round(err, 4)}


def reference(fn):
    h.copy_(h0)
    fn()
    torch.cuda.synchronize()
    return logits.float().clone()


mb = (sum(w.numel() for ws in Wl for w in ws) + Wh.numel()) * 2 / 1e6
want_plain, want_swiglu = reference(cublas_step(False, False)), reference(cublas_step(False, True))
want_layers = reference(cublas_step(True, False))
rows = {}
for section, name, fn, want in [
        ("chain", "cublas", cublas_step(False, False), want_plain),
        ("chain", "sg, no pdl", sg_step(False, False, 0), want_plain),
        ("chain", "sg, pdl", sg_step(False, False, 1), want_plain),
        ("chain", "sg, pdl, SwiGLU in the w1|w3 epilogue", sg_step(False, True, 1), want_swiglu),
        ("layers", "cublas (the lean step now)", cublas_step(True, False), want_layers),
        ("layers", "sg, pdl", sg_step(True, False, 1), want_layers),
        ("layers", "sg, pdl, SwiGLU in the w1|w3 epilogue", sg_step(True, True, 1), want_layers),
        ("layers", "sg, no pdl, SwiGLU fused", sg_step(True, True, 0), want_layers),
        ("layers", "cublas again", cublas_step(True, False), want_layers)]:
    row = rows.setdefault(section, {})[name] = check_and_time(fn, want)
    if section == "chain":
        row["TB/s"] = round(mb / row["us"], 2)
    print(section, name, json.dumps(row), flush=True)
json.dump({"device": torch.cuda.get_device_name(), "best": {k: label(*v) for k, v in best.items()}, "per_gemm": res,
           **rows}, open(os.path.join(os.environ.get("OUT", "."), "skinny_gemm.json"), "w"))
