"""EXPERIMENT (session 24, issue 7): ffn_fused.cu, a decoder layer's feed-forward half as one persistent
kernel, against the lean step's three kernels (cuBLAS w1|w3, swiglu_rows, cuBLAS w2 + residual), at the
cat-150m decoder's shapes (D 1536, F 4096, batch 64, bf16, folded ffn norm), on a Hopper GPU. Build the
library first (skinny_gemm.cu's header), then from the repository root:
    python tools/experiments/skinny_gemm/bench_ffn_fused.py

0. one launch per config, exiting with the kernel's report if any of its (bounded) waits timed out;
1. correctness against fp32 (act rounded to bf16 as both paths do), M 64 and 37, each config; three
   layers in a row, eager and replayed from a CUDA graph (the kernel's flags reset themselves); then the
   timeline of one launch (each CTA's %globaltimer stamps);
2. us per layer: 12 layers' FFN halves (distinct weights, streamed from HBM) in one CUDA graph, and
   each phase alone;
3. us per step: the lean step's 12 layers (wqkv, rope_attention, wo + residual, FFN) and the head,
   with either FFN, and with every GEMM one of this folder's kernels, each checked against the first.
Writes ffn_fused.json to $OUT (or the working directory)."""
import ctypes
import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[2]), str(HERE.parents[1]), str(HERE)]
from bench_attention import graph_us  # noqa: E402  (us per call, replayed from one CUDA graph)
from cat_titan.infer.decode_block import rope_attention, swiglu_rows  # noqa: E402

# exits without a Hopper GPU or the library
from sglib import G, chunk32_caches, interleave, lib, stream_ptr, swiglu_ref, tmap  # noqa: E402

dev, bf = "cuda", torch.bfloat16
torch.manual_seed(0)
D, Fh, V, L, B, EPS = 1536, 4096, 32000, 12, 64, 1e-5
SMS = torch.cuda.get_device_properties(0).multi_processor_count
DBG_INTS = 24  # ffn_fused.cu's DBG: per CTA [code, seen, target, thread] + 10 u64 timestamps


class FFN:
    """h (M, D) += SwiGLU(r * h w13^T) w2^T in place, one launch; w13 = [w1; w3] (2F, D) with the norm folded in."""
    def __init__(self, h, w13, w2, stages=8, S=None, pdl=1, phases=3):
        (M, Dm), Fn = h.shape, w2.shape[1]
        self.S = S or SMS // (Dm // 128)
        self.act = torch.empty(64, Fn, device=dev, dtype=bf)
        self.part = torch.empty(SMS * 128 * 64, device=dev)
        self.rs = torch.empty(64, device=dev)
        self.cnt = torch.zeros(lib.ffn_counters(Dm, Fn), device=dev, dtype=torch.int32)
        self.dbg = torch.zeros(SMS, DBG_INTS, device=dev, dtype=torch.int32)
        self.w13i = interleave(w13[:Fn], w13[Fn:], 16)  # 16-row groups [8 w1 | the same 8 of w3]
        maps = [tmap(self.w13i, 64), tmap(h, 64), tmap(w2, 128), tmap(self.act, 64)]
        self.maps = ctypes.create_string_buffer(b"".join(m.raw for m in maps), 512)
        ptr = lambda t: ctypes.c_void_p(t.data_ptr())
        self.args = (stages, self.maps, ptr(h), ptr(self.act), ptr(self.part), ptr(self.rs), ptr(self.cnt),
                     ptr(self.dbg), M, Dm, Fn, self.S, ctypes.c_float(EPS), SMS, pdl, phases)
        self.keep = (h, w2)

    def __call__(self):
        r = lib.ffn_launch(*self.args, stream_ptr())
        assert r == 0, ("ffn_launch", r)

    def check(self):
        """Exit with the kernel's report if any wait timed out (see ffn_fused.cu's stuck())."""
        bad = self.dbg[:, 0].nonzero().flatten().tolist()
        if bad:
            rows = {c: self.dbg[c].tolist() for c in bad[:12]}
            sys.exit(f"FAIL: {len(bad)} CTAs timed out in a wait (cta: [code, seen, target, thread]): {rows}; "
                     f"counters {self.cnt.tolist()}")


def ffn_ref(h, w13, w2):
    """fp32 h + SwiGLU(r * h w13^T) w2^T, act rounded to bf16."""
    act = swiglu_ref(h, *w13.chunk(2), EPS).to(bf).float()
    return h.float() + act @ w2.float().t()


def ffn_lean(h, w13, w2, gu):
    """The lean step's FFN half now: three kernels."""
    torch.mm(h, w13.t(), out=gu)
    h.addmm_(swiglu_rows(gu, h, EPS), w2.t())


def rel(a, want):
    return ((a.float() - want).abs().max() / want.abs().max()).item()


def save(out):
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "ffn_fused.json"), "w"), indent=1)


print(torch.cuda.get_device_name(), torch.__version__, f"{SMS} SMs", flush=True)
out = {"device": torch.cuda.get_device_name(), "sms": SMS}
CONFIGS = [(st, S) for st in (8, 6) for S in (SMS // 12, 8, 6)]

# 0. one launch, and the waits' report
W = [(torch.randn(2 * Fh, D, device=dev, dtype=bf) * .02, torch.randn(D, Fh, device=dev, dtype=bf) * .02)
     for _ in range(L)]
for st, S in CONFIGS:
    f = FFN(torch.randn(B, D, device=dev, dtype=bf), *W[0], st, S, 0)
    f()
    torch.cuda.synchronize()
    f.check()
    print(f"one launch, stages {st} split {S}: every wait ended", flush=True)

# 1. correctness
worst = {}
for M in (64, 37):
    h0 = torch.randn(M, D, device=dev, dtype=bf)
    want = ffn_ref(h0, *W[0])
    hl = h0.clone()
    ffn_lean(hl, *W[0], torch.empty(M, 2 * Fh, device=dev, dtype=bf))
    out[f"lean_rel_err_M{M}"] = rel(hl, want)
    for st, S in CONFIGS:
        h = h0.clone()
        f = FFN(h, *W[0], st, S, 0)
        f()
        torch.cuda.synchronize()
        f.check()
        worst[(st, S)] = max(worst.get((st, S), 0), rel(h, want))
    print(f"M={M}: lean path rel err {out[f'lean_rel_err_M{M}']:.3g}; fused",
          {f"{st}/{S}": round(worst[(st, S)], 5) for st, S in CONFIGS}, flush=True)
bad = [c for c, e in worst.items() if not e < 8e-3]
h0 = torch.randn(B, D, device=dev, dtype=bf)
want = h0.clone()
for w in W[:3]:
    want = ffn_ref(want.to(bf), *w)
h = h0.clone()
chain = [FFN(h, *w, 8, None, 1) for w in W[:3]]
for f in chain:
    f()
torch.cuda.synchronize()
e_eager = rel(h, want)
g = torch.cuda.CUDAGraph()
with torch.cuda.graph(g):
    for f in chain:
        f()
errs = []
for _ in range(3):
    h.copy_(h0)
    g.replay()
    torch.cuda.synchronize()
    errs.append(rel(h, want))
print(f"3 layers: eager rel err {e_eager:.3g}, graph replays {[round(e, 5) for e in errs]}", flush=True)
out["correct"] = {"per_config_worst": {f"{st}/{S}": v for (st, S), v in worst.items()}, "three_layers_eager": e_eager,
                  "three_layers_graph": errs, "failing": [f"{st}/{S}" for st, S in bad]}
if bad or not max(errs + [e_eager]) < 2e-2:
    print("FAIL: correctness", bad, flush=True)
    save(out)
    sys.exit(1)

# timeline of one launch, weights not in L2: each CTA's globaltimer stamps, us after the earliest start
STAMPS = ["start", "A mainloop done", "A row scales in smem", "A act stored + counted", "B mainloop done",
          "B partial stored + fenced", "B all splits in", "B reduced into h", "end"]
hh = h0.clone()
fs = [FFN(hh, *w, 8, None, 0) for w in W]  # 12 layers' weights: the last one's are not in L2
for _ in range(2):
    for f in fs:
        f()
torch.cuda.synchronize()
f.check()
ts = f.dbg[:, 4:4 + 2 * len(STAMPS)].contiguous().view(torch.int64).double()  # (SMS, 9) ns
t0 = ts[:, 0].min()
timeline = {}
for k, name in enumerate(STAMPS):
    v = ts[:, k][ts[:, k] > 0] - t0
    if len(v):
        timeline[name] = [round(x / 1e3, 2) for x in (v.min().item(), v.median().item(), v.max().item())]
print("timeline (us: min / median / max over CTAs):", json.dumps(timeline), flush=True)
out["timeline_us_min_median_max"] = timeline

# 2. the FFN half alone, 12 layers
h = h0.clone()
gu = torch.empty(B, 2 * Fh, device=dev, dtype=bf)
rows = {"lean (cuBLAS + swiglu_rows + cuBLAS)": graph_us(lambda: [ffn_lean(h, w13, w2, gu) for w13, w2 in W], 4) / L}
for st, S in CONFIGS:
    for pdl in (1, 0):
        fs = [FFN(h, w13, w2, st, S, pdl) for w13, w2 in W]
        rows[f"fused stages {st} split {S} pdl {pdl}"] = graph_us(lambda: [f() for f in fs], 4) / L
    print({k: round(v, 2) for k, v in rows.items()}, flush=True)
for st, S in CONFIGS[:2]:
    for ph in (1, 2):
        fs = [FFN(h, w13, w2, st, S, 0, ph) for w13, w2 in W]
        rows[f"phase {'AB'[ph - 1]} alone, stages {st} split {S}"] = graph_us(lambda: [f() for f in fs], 4) / L
print({k: round(v, 2) for k, v in rows.items() if k.startswith("phase")}, flush=True)
out["ffn_us_per_layer"] = {k: round(v, 2) for k, v in rows.items()}
best = min((k for k in rows if k.startswith("fused")), key=rows.get)
bst, bS = (int(best.split()[i]) for i in (2, 4))
print("best", best, flush=True)

# 3. the lean step's layers (folded norms, chunk-32 cache mid-generation) + head, either FFN
Wa = [(torch.randn(3 * D, D, device=dev, dtype=bf) * .02, torch.randn(D, D, device=dev, dtype=bf) * .02)
      for _ in range(L)]
Wh = torch.randn(V, D, device=dev, dtype=bf) * .02
kcs, vcs, cos, sin, cols, lens = chunk32_caches(B, L)
qkv = torch.empty(B, 3 * D, device=dev, dtype=bf)
logits = torch.empty(B, V, device=dev, dtype=bf)
fused = [FFN(h, w13, w2, bst, bS, 1) for w13, w2 in W]  # PDL: its W13 stream may start during wo
# skinny_gemm.cu's GEMMs at session 23's best (cfg, split): wqkv BN64x12 unsplit, wo BN128x8 split 8, head BN128x4
gq = [G(h, wq, qkv, 0, 3, 1, 1) for wq, _ in Wa]
ghead = G(h, Wh, logits, 0, 0, 1, 1)


def step(use_fused, custom_gemms=False):
    """custom_gemms: every GEMM a PDL launch of this folder's kernels (only rope_attention is not)."""
    def run():
        for l, (wq, wo) in enumerate(Wa):
            if custom_gemms:
                gq[l]()
            else:
                torch.mm(h, wq.t(), out=qkv)
            y = rope_attention(qkv, kcs[l], vcs[l], cos, sin, cols, lens, 1, 1, h, EPS)
            if custom_gemms:
                G(y, wo, h, 1, 2, 8, 1)()  # y is new each call: its map is made here (at capture)
            else:
                h.addmm_(y, wo.t())
            if use_fused:
                fused[l]()
            else:
                ffn_lean(h, *W[l], gu)
        if custom_gemms:
            ghead()
        else:
            torch.mm(h, Wh.t(), out=logits)
    return run


res = {}
for name, fn in [("lean", step(False)), ("fused FFN", step(True)), ("fused FFN, every GEMM custom with PDL",
                 step(True, True)), ("lean again", step(False)), ("fused FFN again", step(True))]:
    h.copy_(h0)
    fn()
    torch.cuda.synchronize()
    lg = logits.float().clone()
    res[name] = {"us": round(graph_us(fn, calls=4), 1)}
    if name == "lean":
        want = lg
    res[name]["logits_rel_err_vs_lean"] = round(rel(lg, want), 4)
    print("step", name, json.dumps(res[name]), flush=True)
out["step_us"] = res
out["step_best_config"] = best
save(out)
