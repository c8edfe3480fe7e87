"""EXPERIMENT (session 23, issue 7): skinny_gemm.cu against cuBLAS at the decode step's shapes
(cat-150m decoder, batch 64, bf16), on a Hopper GPU. Not used by cat_titan; results and what
they mean: docs/benchmarks.md, "Session 23". Build the library first (skinny_gemm.cu's header),
then, from the repository root: python tools/experiments/skinny_gemm/bench_skinny_gemm.py

1. correctness of every config / split / mode against fp32 products (ragged M included);
2. us per GEMM (12 distinct weights streamed from HBM in one CUDA graph), each config, with PDL;
3. the 49 GEMMs of a step as one dependent chain: cuBLAS, this kernel without and with PDL,
   and with SwiGLU in the w1|w3 epilogue, each checked against its reference chain;
4. the layers as the lean step runs them (folded norms): wqkv, cat_titan's rope_attention,
   wo + residual, w1|w3, swiglu_rows, w2 + residual, then the head: cuBLAS against this kernel.
Writes skinny_gemm.json to $OUT (or the working directory)."""
import ctypes, json, os, sys, time
import torch
import torch.nn.functional as F

LIB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "libskinny_gemm.so")
if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
    sys.exit("bench_skinny_gemm.py needs a Hopper GPU (compute capability 9.0): "
             "the kernel uses TMA, wgmma and thread-block clusters")
if not os.path.exists(LIB):
    sys.exit(f"{LIB} is missing: build it with the nvcc command in skinny_gemm.cu's header (CUDA 12.5 or newer)")
lib = ctypes.CDLL(LIB)
dev, bf = "cuda", torch.bfloat16
torch.manual_seed(0)
CFGS = {2: "BN128x4wg", 3: "BN64x6wg", 4: "BN128x8wg", 5: "BN64x12wg", 6: "BN128x6wg", 7: "BN64x4wg"}
BOX = {c: lib.sg_box_rows(c) for c in CFGS}


def tmap(t, box_rows):
    assert t.dtype == bf and t.stride(1) == 1
    buf = ctypes.create_string_buffer(128)
    r = lib.sg_make_tmap(buf, ctypes.c_void_p(t.data_ptr()), ctypes.c_longlong(t.shape[0]),
                         ctypes.c_longlong(t.shape[1]), ctypes.c_longlong(t.stride(0)), ctypes.c_int(box_rows))
    assert r == 0, ("tmap", r)
    return buf


class G:
    """One prepared launch: out (M, N) [+]= x (M, K) @ w (N, K)^T."""
    def __init__(self, x, w, out, add, cfg, S, pdl, eps=1e-5):
        self.tw, self.tx = tmap(w, BOX[cfg]), tmap(x, 64)
        self.args = (cfg, self.tw, self.tx, ctypes.c_void_p(out.data_ptr()), add, ctypes.c_float(eps),
                     x.shape[0], w.shape[0],
                     w.shape[1], out.stride(0), S, pdl)
        self.keep = (x, w, out)

    def __call__(self):
        r = lib.sg_launch(*self.args, ctypes.c_void_p(torch.cuda.current_stream().cuda_stream))
        assert r == 0, ("launch", r)


def graph_us(fn, reps=30):
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(True), torch.cuda.Event(True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / reps, g


print(torch.cuda.get_device_name(), torch.__version__, flush=True)
shapes = {"qkv": (4608, 1536), "wo": (1536, 1536), "gu": (8192, 1536), "w2": (1536, 4096), "head": (32000, 1536)}
SPL = {128: {"qkv": [2, 3, 4], "wo": [8], "gu": [1, 2], "w2": [8], "head": [1]},
       64: {"qkv": [1, 2], "wo": [2, 4, 5], "gu": [1, 2], "w2": [2, 4, 5], "head": [1]}}
splits = {k: sorted(set(SPL[128][k] + SPL[64][k])) for k in SPL[128]}

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
                for add in (0, 1):
                    out = r0.clone() if add else torch.full((M, N), 7.0, device=dev, dtype=bf)
                    G(x, w, out, add, cfg, S, 0)()
                    torch.cuda.synchronize()
                    want = ref + (r0.float() if add else 0)
                    err = (out.float() - want).abs().max().item()
                    rel = err / want.abs().max().item()
                    worst = max(worst, rel)
                    if not (rel < 8e-3):
                        print(f"FAIL {name} M={M} {CFGS[cfg]} S={S} add={add}: max err {err:.4g} (rel {rel:.3g});"
                              f" cuBLAS {cub:.4g}", flush=True)
                        sys.exit(1)
    print(f"ok {name}: cuBLAS max err {cub:.3g}", flush=True)
print(f"correctness: all pass, worst rel {worst:.3g} ({time.time() - t0:.0f} s)", flush=True)


def interleave(w1, w3, bn=128):
    """(F, D) x 2 -> (2F, D): bn-row blocks [bn/2 rows of w1 | the same bn/2 units of w3] (mode 2's tile)."""
    F_, D_ = w1.shape
    hb = bn // 2
    return torch.stack([w1.view(F_ // hb, hb, D_), w3.view(F_ // hb, hb, D_)], 1).reshape(2 * F_, D_)


def swiglu_ref(hh, w1, w3, eps=1e-5):
    r = torch.rsqrt(hh.float().pow(2).mean(-1, keepdim=True) + eps)
    return F.silu((hh.float() @ w1.float().t()) * r) * ((hh.float() @ w3.float().t()) * r)


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
                    print(f"FAIL swiglu F={Fh_} D={D_} M={M} {CFGS[cfg]} S={S}: rel {rel:.3g}", flush=True)
                    bad2.add((cfg, S))
print(f"correctness: mode 2 (SwiGLU with the RMSNorm row scale in the epilogue): failing {sorted(bad2)}", flush=True)

# 2. per GEMM
B, L = 64, 12
best = {}
res = {}
for name, (N, K) in shapes.items():
    n = 1 if name == "head" else L
    Ws = [torch.randn(N, K, device=dev, dtype=bf) * .02 for _ in range(n)]
    x = torch.randn(B, K, device=dev, dtype=bf)
    outs = [torch.empty(B, N, device=dev, dtype=bf) for _ in range(n)]
    row = {"cublas": graph_us(lambda: [F.linear(x, w) for w in Ws])[0] / n}
    for cfg in CFGS:
        for S in SPL[BOX[cfg]][name]:
            for pdl in (1,):
                gs = [G(x, w, o, 0, cfg, S, pdl) for w, o in zip(Ws, outs)]
                row[f"{CFGS[cfg]}/S{S}/pdl{pdl}"] = graph_us(lambda: [g() for g in gs])[0] / n
    mb = N * K * 2 / 1e6
    k = min((k for k in row if k != "cublas"), key=row.get)
    best[name] = k
    res[name] = {k: round(v, 2) for k, v in sorted(row.items(), key=lambda kv: kv[1])}
    print(f"{name} ({mb:.1f} MB): cuBLAS {row['cublas']:.2f} us ({mb / row['cublas']:.2f} TB/s); "
          f"best {k} {row[k]:.2f} us ({mb / row[k]:.2f} TB/s)", flush=True)
    print("   ", json.dumps(res[name]), flush=True)
    Ws = outs = None  # free before the next shape
    torch.cuda.empty_cache()

# 3. the dependent chain of one decode step
D, Fh, V = 1536, 4096, 32000
Wl = [[torch.randn(3 * D, D, device=dev, dtype=bf) * .02, torch.randn(D, D, device=dev, dtype=bf) * .02,
       torch.randn(2 * Fh, D, device=dev, dtype=bf) * .02, torch.randn(D, Fh, device=dev, dtype=bf) * .02]
      for _ in range(L)]
Wh = torch.randn(V, D, device=dev, dtype=bf) * .02
h0 = torch.randn(B, D, device=dev, dtype=bf)
h = h0.clone()
qkv = torch.empty(B, 3 * D, device=dev, dtype=bf)
gu = torch.empty(B, 2 * Fh, device=dev, dtype=bf)
logits = torch.empty(B, V, device=dev, dtype=bf)


def cublas_chain():
    for wq, wo, wgu, w2 in Wl:
        torch.mm(h, wq.t(), out=qkv)
        h.addmm_(qkv[:, :D], wo.t())
        torch.mm(h, wgu.t(), out=gu)
        h.addmm_(gu[:, :Fh], w2.t())
    torch.mm(h, Wh.t(), out=logits)


def parse(k):
    c, s, _ = k.split("/")
    return [i for i, v in CFGS.items() if v == c][0], int(s[1:])


def sg_chain(pdl):
    gs = []
    for wq, wo, wgu, w2 in Wl:
        gs.append(G(h, wq, qkv, 0, *parse(best["qkv"]), pdl))
        gs.append(G(qkv[:, :D], wo, h, 1, *parse(best["wo"]), pdl))
        gs.append(G(h, wgu, gu, 0, *parse(best["gu"]), pdl))
        gs.append(G(gu[:, :Fh], w2, h, 1, *parse(best["w2"]), pdl))
    gs.append(G(h, Wh, logits, 0, *parse(best["head"]), pdl))
    return lambda: [g() for g in gs]


act = torch.empty(B, Fh, device=dev, dtype=bf)
FUSED_CFG = parse(best["gu"])
if FUSED_CFG in bad2:
    FUSED_CFG = (2, 2)
print("fused gu config", FUSED_CFG, flush=True)
W13 = [interleave(wgu[:Fh], wgu[Fh:], BOX[FUSED_CFG[0]]) for _, _, wgu, _ in Wl]


def sg_fused_chain(pdl):
    """gu -> SwiGLU(r *) in the epilogue (mode 2), w2 reads act: the swiglu kernel is gone."""
    cg_, sg_ = parse(best["qkv"]); co, so = parse(best["wo"]); cw, sw = parse(best["w2"])
    gs = []
    for (wq, wo, _, w2), w13 in zip(Wl, W13):
        gs.append(G(h, wq, qkv, 0, cg_, sg_, pdl))
        gs.append(G(qkv[:, :D], wo, h, 1, co, so, pdl))
        gs.append(G(h, w13, act, 2, FUSED_CFG[0], FUSED_CFG[1], pdl))
        gs.append(G(act, w2, h, 1, cw, sw, pdl))
    gs.append(G(h, Wh, logits, 0, *parse(best["head"]), pdl))
    return lambda: [g() for g in gs]


def torch_fused_ref():
    for wq, wo, wgu, w2 in Wl:
        torch.mm(h, wq.t(), out=qkv)
        h.addmm_(qkv[:, :D], wo.t())
        h.addmm_(swiglu_ref(h, wgu[:Fh], wgu[Fh:]).to(bf), w2.t())
    torch.mm(h, Wh.t(), out=logits)


h.copy_(h0); torch_fused_ref(); torch.cuda.synchronize()
want_fused = logits.float().clone()
h.copy_(h0); cublas_chain(); torch.cuda.synchronize()
want = logits.float().clone()
mb = (sum(w.numel() for ws in Wl for w in ws) + Wh.numel()) * 2 / 1e6
chain = {}
for label, fn in [("cublas", cublas_chain), ("sg_pdl0", sg_chain(0)), ("sg_pdl1", sg_chain(1)),
                  ("sg_fused_swiglu_pdl1", sg_fused_chain(1))]:
    h.copy_(h0)
    us, g = graph_us(fn, reps=1)  # warm-up runs + one replay: 4 chains from h0 would drift; check one
    h.copy_(h0); g.replay(); torch.cuda.synchronize()
    ref = want_fused if "fused" in label else want
    err = (logits.float() - ref).abs().max().item() / ref.abs().max().item()
    us = graph_us(fn, reps=30)[0]
    chain[label] = {"us": round(us, 1), "TB/s": round(mb / us, 2), "rel_err_vs_cublas": round(err, 4)}
    print("chain", label, json.dumps(chain[label]), flush=True)
# 4. the layers as the lean step runs them (folded norms; chunk-32 cache mid-generation):
#    wqkv, rope_attention (Triton), wo + residual, w1|w3, swiglu_rows (Triton), w2 + residual; then the head
sys.path.insert(0, os.getcwd())
from cat_titan.infer.decode_block import rope_attention, swiglu_rows
Hh, hd, NC = 24, 64, 96
kcs = [torch.randn(B, Hh, NC, hd, device=dev, dtype=bf) for _ in range(L)]
vcs = [torch.randn(B, Hh, NC, hd, device=dev, dtype=bf) for _ in range(L)]
ang = torch.rand(B, hd // 2, device=dev) * 6
cos, sin = torch.cat([ang.cos()] * 2, -1).to(bf), torch.cat([ang.sin()] * 2, -1).to(bf)
cols = torch.full((B,), 60, device=dev, dtype=torch.long)
lens = cols + 1
eps = 1e-5


def layers_cublas():
    for l, (wq, wo, wgu, w2) in enumerate(Wl):
        torch.mm(h, wq.t(), out=qkv)
        y = rope_attention(qkv, kcs[l], vcs[l], cos, sin, cols, lens, 1, 1, h, eps)
        h.addmm_(y, wo.t())
        torch.mm(h, wgu.t(), out=gu)
        h.addmm_(swiglu_rows(gu, h, eps), w2.t())
    torch.mm(h, Wh.t(), out=logits)


def layers_sg(fused, pdl=1):
    cq, sq = parse(best["qkv"]); co, so = parse(best["wo"]); cw, sw = parse(best["w2"]); cgu, sgu = parse(best["gu"])
    hd_ = G(h, Wh, logits, 0, *parse(best["head"]), pdl)
    gq = [G(h, wq, qkv, 0, cq, sq, pdl) for wq, _, _, _ in Wl]
    ggu = [G(h, w13, act, 2, *FUSED_CFG, pdl) if fused else G(h, wgu, gu, 0, cgu, sgu, pdl)
           for (_, _, wgu, _), w13 in zip(Wl, W13)]
    gw2 = [G(act, w2, h, 1, cw, sw, pdl) for _, _, _, w2 in Wl]

    def run():
        for l, (wq, wo, wgu, w2) in enumerate(Wl):
            gq[l]()
            y = rope_attention(qkv, kcs[l], vcs[l], cos, sin, cols, lens, 1, 1, h, eps)
            G(y, wo, h, 1, co, so, pdl)()  # y is new each call: its map is made here (once, at capture)
            ggu[l]()
            if fused:
                gw2[l]()
            else:
                G(swiglu_rows(gu, h, eps), w2, h, 1, cw, sw, pdl)()
        hd_()
    return run


h.copy_(h0); layers_cublas(); torch.cuda.synchronize()
want_l = logits.float().clone()
layers = {}
for label, fn in [("cublas (the lean step now)", layers_cublas), ("sg, pdl", layers_sg(False)),
                  ("sg, pdl, SwiGLU in the w1|w3 epilogue", layers_sg(True)),
                  ("sg, no pdl, SwiGLU fused", layers_sg(True, 0)),
                  ("cublas again", layers_cublas)]:
    h.copy_(h0)
    us, g = graph_us(fn, reps=1)
    h.copy_(h0); g.replay(); torch.cuda.synchronize()
    err = (logits.float() - want_l).abs().max().item() / want_l.abs().max().item()
    us = graph_us(fn, reps=30)[0]
    layers[label] = {"us": round(us, 1), "rel_err_vs_cublas": round(err, 4)}
    print("layers", label, json.dumps(layers[label]), flush=True)
json.dump({"device": torch.cuda.get_device_name(), "best": best, "per_gemm": res, "chain": chain, "layers": layers},
          open(os.path.join(os.environ.get("OUT", "."), "skinny_gemm.json"), "w"))
