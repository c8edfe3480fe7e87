"""decode_linear: norm + matmul + SwiGLU / residual in one kernel equals the model's ops.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 must be set before the
kernel is defined, hence subprocesses), float32:
* the kernel alone against ``reference_decode_linear`` (the model's RMSNorm, F.linear,
  SwiGLU, add) for every combination of norm / residual / SwiGLU, ragged shapes, K split
  over 1-3 programs and stream-K over 5, 13 and more programs than units of work; and as the
  qkv projection with RoPE and K/V cache writes against ``reference_decode_qkv`` (1-2 queries
  per row, 1-2 query heads per KV head, head dims 16 and 32, K split 1-2); tolerance 2e-5
  (fp32 sums in another order, outputs of order 1-10), and the split-K counters must be back at zero after each call;
* generation with every fusable block and the head on the kernel (interpreted) against
  greedy decoding by full forward passes: same tokens, logits to 1e-4 (as test_generate.py),
  once with the default tiles and once (two of the models) with a forced 2-way K split or
  stream-K on 6 programs.
On CPU without the interpreter the fused runner computes exactly what the unfused one does
(same modules). Without a GPU: the kernel compiled for sm_90, torch.compile's view of what it
writes, and the compiled step's graph. On CUDA: the bf16 tests below and
test_generate_cuda.py. (Triton 3.9's interpreter computes garbage for bf16 dots, in
decode_attention's kernel as well, so the bf16 tests' logic was checked there in fp16.)
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cat_titan.infer import generate, make_runner, stream
from cat_titan.infer.decode_linear import triton

from .. import interpreter
from ..interpreter import INTERPRETABLE, WHY_NOT
from .util import debug_model

ROOT = Path(__file__).resolve().parents[2]

KERNEL_CHECK = textwrap.dedent("""
    import itertools, json, torch
    from cat_titan.infer.decode_linear import (fold_norm_weight, launch_decode_linear, make_locks,
                                               reference_decode_linear)
    from cat_titan.models.common import RMSNorm
    torch.manual_seed(0)
    rows = []
    # (M, N, K): ragged in every dimension, one tile-aligned with several tiles along each
    # (64, 64, 128: a third of the interpreter's time of the 64 x 96 x 256 it replaced)
    for M, N, K in [(5, 40, 100), (64, 64, 128), (17, 33, 300)]:
        for norm_on, resid, swiglu in itertools.product([False, True], repeat=3):
            x = torch.randn(M, K)
            w = torch.randn((2 if swiglu else 1) * N, K) / K ** 0.5
            norm = None
            if norm_on:
                norm = RMSNorm(K, 1e-5).requires_grad_(False)
                norm.weight.copy_(torch.rand(K) + 0.5)
            res = torch.randn(M, N) if resid else None
            want = reference_decode_linear(x, w, norm, res, swiglu)
            locks = make_locks("cpu")
            # split-K over 1-3 programs per tile; stream-K over 5, 13 and more programs than units
            for cfg in (dict(SPLIT_K=1, BM=16, BN=16, BK=32), dict(SPLIT_K=3, BM=16, BN=32, BK=32),
                        dict(SPLIT_K=2, BM=64, BN=16, BK=64), dict(PROGRAMS=5, BM=16, BN=16, BK=32),
                        dict(PROGRAMS=13, BM=16, BN=32, BK=32), dict(PROGRAMS=500, BM=16, BN=16, BK=64)):
                g = None if norm is None else norm.weight
                out = launch_decode_linear(x, w, g, res, locks, 1e-5, swiglu, cfg)
                rows.append(dict(shape=[M, N, K], norm=norm_on, residual=resid, swiglu=swiglu, cfg=cfg,
                                 out_shape=list(out.shape), err=(out - want).abs().max().item(),
                                 scale=want.abs().max().item(), locks=int(locks.abs().sum())))
                if norm_on and cfg.get("SPLIT_K") != 1 and cfg.get("PROGRAMS") != 500:  # norm weight folded into w
                    out = launch_decode_linear(x, fold_norm_weight(w, g), None, res,
                                               locks, 1e-5, swiglu, cfg, g_in_w=True)
                    rows.append(dict(shape=[M, N, K], norm=norm_on, residual=resid, swiglu=swiglu, cfg=cfg,
                                     folded=True, out_shape=list(out.shape), err=(out - want).abs().max().item(),
                                     scale=want.abs().max().item(), locks=int(locks.abs().sum())))
    # the projection with RoPE and the K/V cache writes: queries per batch row T, q heads per kv head G
    from cat_titan.infer.decode_linear import reference_decode_qkv
    from cat_titan.models.common import rope_table
    for T, G, hd, sched in itertools.product([1, 2], [1, 2], [16, 32], [dict(SPLIT_K=1), dict(SPLIT_K=2),
                                                                         dict(PROGRAMS=4), dict(PROGRAMS=7)]):
        B, Hkv, D, n_cols = 3, 2, 48, 7
        M = B * T
        x, w = torch.randn(M, D), torch.randn(Hkv * (G + 2) * hd, D) / D ** 0.5
        norm = RMSNorm(D).requires_grad_(False)
        norm.weight.copy_(torch.rand(D) + 0.5)
        cos_t, sin_t = rope_table(hd, 20, 10000.0)
        ids = torch.randint(0, 20, (M,))
        cols = torch.stack([torch.randperm(n_cols)[:T] for _ in range(B)]).reshape(M)  # distinct per batch row
        k0, v0 = torch.randn(B, Hkv, n_cols, hd), torch.randn(B, Hkv, n_cols, hd)
        k1, v1 = k0.clone(), v0.clone()
        want = reference_decode_qkv(x, w, norm, k0, v0, cos_t[ids], sin_t[ids], cols, T, G)
        locks = make_locks("cpu")
        got = launch_decode_linear(x, w, norm.weight, None, locks, 1e-5, False,
                                   dict(sched, BM=16, BK=16), qkv=(k1, v1, cos_t[ids], sin_t[ids], cols, T, G))
        rows.append(dict(shape=[M, hd, D], qkv=[T, G], cfg=sched, out_shape=list(got.shape),
                         want_shape=list(want.shape), err=max((got - want).abs().max().item(),
                         (k1 - k0).abs().max().item(), (v1 - v0).abs().max().item()),
                         scale=want.abs().max().item(), locks=int(locks.abs().sum())))
    print(json.dumps(rows))
""")

GENERATION_CHECK = textwrap.dedent("""
    import json, sys, torch
    import cat_titan.infer.decode_linear as dl
    from cat_titan.infer import make_runner, stream
    from tests.infer.util import perturbed, greedy_by_full_forward

    dl.use_kernel = lambda x: True  # CPU tensors through the interpreted kernel
    launches = [0]
    launch = dl.launch_decode_linear
    calls = []
    def counted(*args, **kw):
        launches[0] += 1
        calls.append((args, kw))
        return launch(*args, **kw)
    dl.launch_decode_linear = counted
    cases = [("debug-cat", None), ("debug-cat-adaptive", 4), ("debug-dense", None), ("debug-hybrid", None)]
    schedules = [dict(SPLIT_K=1, PROGRAMS=0)] * len(cases)
    folds = [False] * len(cases)
    if sys.argv[1] == "split":  # slower: two models, debug-cat's K ranges split over two programs per tile
        # with the norm weights folded into the weights, debug-cat-adaptive's work cut into 6 equal ranges
        # (stream-K: tiles shared between programs)
        cases, schedules = cases[:2], [dict(SPLIT_K=2, PROGRAMS=0), dict(SPLIT_K=1, PROGRAMS=6)]
        folds = [True, False]
    out = []
    for (name, chunk), sched, fold in zip(cases, schedules, folds):
        if sys.argv[1] == "split":
            dl.linear_config = lambda M, N, K, swiglu, sms, BN=32, s=sched: dict(BM=16, BN=32, BK=32, num_warps=4,
                                                                           num_stages=1, **s)
        model = perturbed(name)
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (5, 11, 16)]
        runner = make_runner(model, len(prompts), 16 + 12, chunk or model.args.chunk_size)
        fused = runner.fuse_linears(fold_norms=fold)
        launches[0] = 0
        steps = list(stream(model, prompts, 12, chunk_size=chunk, runner=runner))
        tokens = torch.stack([s.tokens for s in steps], 1)
        logits = torch.stack([s.logits for s in steps], 1)
        res = dict(name=name, fused=fused, launches=launches[0], rows=[], folded=fold,
                   folded_launches=sum(kw.get("g_in_w", False) for _, kw in calls),
                   norm_in_kernel=sum(args[2] is not None for args, _ in calls))  # launches given g to scale x
        calls.clear()
        for b, p in enumerate(prompts):
            want, want_logits = greedy_by_full_forward(model, p, 12, chunk)
            res["rows"].append(dict(same_tokens=tokens[b].tolist() == want,
                                    err=(logits[b] - want_logits).abs().max().item()))
        out.append(res)
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def interpreted():
    """The three interpreted checks (single-threaded Python, 30-60 s each) started together on
    first use, so they share the machine's cores instead of running one after another; each
    test waits for its own."""
    procs = {"kernel": interpreter.start(KERNEL_CHECK), "default": interpreter.start(GENERATION_CHECK, "default"),
             "split": interpreter.start(GENERATION_CHECK, "split")}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.skipif(not INTERPRETABLE, reason=WHY_NOT)
def test_kernel_in_interpreter_equals_reference(interpreted):
    rows = interpreter.result(interpreted["kernel"])
    assert len(rows) == 3 * 8 * 6 + 3 * 4 * 4 + 32  # + the folded-norm rows
    for r in rows:
        if "qkv" in r:  # q (M, Hq*hd) and the cache contents (written columns and untouched ones)
            assert r["out_shape"] == r["want_shape"], r
        else:
            M, N, K = r["shape"]
            assert r["out_shape"] == [M, N], r
        assert r["err"] <= 2e-5 * max(1.0, r["scale"]), r
        assert r["locks"] == 0, r  # every split-K tile reset its counter


@pytest.mark.skipif(not INTERPRETABLE, reason=WHY_NOT)
@pytest.mark.parametrize("tiles", ["default", "split"])
def test_generation_with_interpreted_kernels_equals_full_forward(interpreted, tiles):
    results = interpreter.result(interpreted[tiles])
    by_name = {r["name"]: r for r in results}
    assert len(results) == (4 if tiles == "default" else 2)
    if "debug-hybrid" in by_name:  # CAT layers of the hybrid keep the model's ops; every other block is fused
        assert by_name["debug-hybrid"]["fused"] == [False, False, True]
    for r in results:
        n_fused = sum(r["fused"])
        assert all(r["fused"]) or r["name"] == "debug-hybrid", r
        # 12 steps: 4 kernels per fused block + the head (the prefill is not fused)
        assert r["launches"] >= 11 * (4 * n_fused + 1), r
        # folded: every normed linear (qkv, w1|w3, head) takes the folded weight, none scales x by g
        if r["folded"]:
            assert r["folded_launches"] > 0 and r["norm_in_kernel"] == 0, r
        else:
            assert r["folded_launches"] == 0 and r["norm_in_kernel"] > 0, r
        for row in r["rows"]:
            assert row["same_tokens"], r
            assert row["err"] <= 1e-4, r


MUTATION_CHECK = textwrap.dedent("""
    import json, torch
    from tests.hopper import activate, written

    activate()
    from cat_titan.infer import decode_linear as dl

    M, N, K, bf = 64, 1536, 4096, torch.bfloat16
    t = lambda *s, dtype=bf: torch.zeros(*s, dtype=dtype)
    out = {}
    # (norm, residual, swiglu, qkv, split); qkv: the projection with RoPE and the K/V cache writes
    for norm, resid, swiglu, qkv, split in [(False, True, False, False, 2), (True, False, True, False, 1),
                                            (True, True, True, False, 3), (True, False, False, True, 1),
                                            (True, False, False, True, 2)]:
        kw = dict(X=t(M, K), W=t(N, K), G=t(K), Res=t(M, N), Out=t(M, N), Work=t(split, 1, M, N, dtype=torch.float32),
                  SSWork=t(split, 48, M, dtype=torch.float32), Locks=dl.make_locks("cpu"),
                  Cos=t(M, 64, dtype=torch.float32), Sin=t(M, 64, dtype=torch.float32), Kc=t(M, 8, 40, 64),
                  Vc=t(M, 8, 40, 64), Cols=t(M, dtype=torch.long), M=M, N=N, K=K, K_SPLIT=2048,
                  sxm=K, sxk=1, swn=K, swk=1, srm=N, srn=1, som=N, son=1, skb=20480, skh=2560, skn=64, skd=1,
                  EPS=1e-5, NORM=norm, SCALE_X=True, RESID=resid, SWIGLU=swiglu, QKV=qkv, GQ=1, T=1, SPLIT_K=split,
                  BM=64,
                  BN=64 if qkv else 32, BK=128, IEEE=False, PDL=0, PREFETCH=False)
        out[f"{split}-{norm}-{qkv}"] = written(dl._decode_linear_kernel, kw)
        # the stream-K kernel on the same tensors: (programs, 2, ...) workspaces, KU and U for K_SPLIT
        sk = {k: v for k, v in kw.items() if k not in ("K_SPLIT", "SPLIT_K")}
        sk.update(Work=t(132, 2, 1, 64, kw["BN"], dtype=torch.float32), SSWork=t(132, 2, 64, dtype=torch.float32),
                  KU=K // 128, U=N // kw["BN"] * K // 128)
        out[f"sk-{norm}-{qkv}"] = written(dl._decode_linear_sk_kernel, sk)
    print(json.dumps(out))
""")


STEP_GRAPH_CHECK = textwrap.dedent("""
    import json, sys, torch
    import triton
    from triton.backends.compiler import GPUTarget

    class HopperTarget:  # no GPU here: inductor needs a target up to code generation
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

    triton.runtime.driver.set_active(HopperTarget())
    import torch._inductor.compile_fx as compile_fx
    import cat_titan.infer.decode_linear as dl
    from cat_titan.infer import generate, make_runner
    from tests.infer.util import perturbed

    dl.use_kernel = lambda x: torch.compiler.is_compiling()  # the kernel in the traced step only
    if len(sys.argv) > 1 and sys.argv[1].startswith("pdl="):  # PDL launches: the opaque custom ops
        import cat_titan.infer.pdl as pdl
        pdl.set_mode(sys.argv.pop(1)[4:])
        pdl.active = lambda t: torch.compiler.is_compiling()
    graphs = []
    post_grad = compile_fx._recursive_post_grad_passes

    def keep(gm, *args, **kwargs):  # the graph inductor lowers (after reinplacing); Triton can't build for CPU
        post_grad(gm, *args, **kwargs)
        graphs.append(gm.graph)
        raise RuntimeError("stop: graph captured")

    compile_fx._recursive_post_grad_passes = keep
    def step_graph(model, fuse):
        runner = make_runner(model, 3, 40, model.args.chunk_size)
        fused = runner.fuse_linears() if fuse else None
        runner.compile_step(mode=None)
        graphs.clear()
        try:
            generate(model, [[1, 2, 3], [4, 5], [6]], 2, runner=runner)
        except Exception as e:
            assert "stop: graph captured" in str(e), e
        nodes = [n for n in graphs[0].nodes if n.op == "call_function"]
        targets = [str(n.target) for n in nodes]
        return dict(
            fused=fused,
            kernels=sum("triton_kernel_wrapper_mutation" in t for t in targets),
            functional=sum("triton_kernel_wrapper_functional" in t for t in targets),
            pdl_ops=sum(t.startswith("cat_titan.") and "_pdl" in t for t in targets),
            modes=sorted({n.args[-1] for n in nodes
                          if str(n.target).startswith("cat_titan.") and "_pdl" in str(n.target)}),
            auto_functionalized=sum("auto_functionalized" in t for t in targets),
            clones=sum("clone" in t for t in targets),
            other_copies=sum("copy_" in str(n.target) and n.args[0] is not n.args[1] for n in nodes),
            index_put_inplace=targets.count("aten.index_put_.default"),
            index_put_copying=targets.count("aten.index_put.default"))

    out = {}
    for name in sys.argv[1:]:
        model = perturbed(name)
        out[name] = dict(unfused=step_graph(model, False), fused=step_graph(model, True))
    print(json.dumps(out))
""")


def _hopper_compiler() -> tuple[bool, str]:
    if triton is None:
        return False, "triton is not installed"
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError as e:
        return False, f"triton's NVIDIA backend is not available ({e})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False, "TRITON_INTERPRET=1 is set: the kernel is an interpreter function here"
    return True, ""


HOPPER_OK, HOPPER_WHY_NOT = _hopper_compiler()


def compile_for_hopper(kernel, ptrs: dict, const: dict, aligned: tuple = (), **options):
    """``kernel`` compiled ahead of time for sm_90 (ptxas from triton's wheel: no GPU needed)
    with the signature Triton's JIT specialises for contiguous tensors: ptrs' pointer types,
    the constexprs in const (unit strides among them), every other argument i32, and the
    pointers and the ``aligned`` sizes divisible by 16 (without that, no vectorised copies)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: ptrs.get(n) or ("constexpr" if n in const else "i32") for n in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in names
                           if n in ptrs or n in aligned})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def compile_decode_linear_for_hopper(norm: bool, resid: bool, swiglu: bool, qkv: bool, split: int,
                                     folded: bool = False, pdl: int = 0, prefetch: bool = False):
    """decode_linear as the runners launch it at batch 64 (1536 -> 4096) with the default tiles:
    split SPLIT_K programs per tile, 0 the stream-K kernel; folded: the norm weight in w; pdl:
    the PDL constexpr (pdl.trigger)."""
    from cat_titan.infer.decode_linear import _decode_linear_kernel, _decode_linear_sk_kernel, linear_config

    ptrs = dict(X="*bf16", W="*bf16", G="*bf16", Res="*bf16", Out="*bf16", Work="*fp32", SSWork="*fp32",
                Locks="*i32", Cos="*fp32", Sin="*fp32", Kc="*bf16", Vc="*bf16", Cols="*i64")
    cfg = linear_config(64, 1536, 4096, False, 132)
    const = dict(sxk=1, swk=1, srn=1, son=1, skd=1, EPS=1e-5, NORM=norm, SCALE_X=not folded, RESID=resid,
                 SWIGLU=swiglu, QKV=qkv, GQ=1, T=1, BM=cfg["BM"], BN=64 if qkv else cfg["BN"], BK=cfg["BK"],
                 IEEE=False, PDL=pdl, PREFETCH=prefetch)
    if split:
        const["SPLIT_K"] = split
    return compile_for_hopper(_decode_linear_sk_kernel if split == 0 else _decode_linear_kernel, ptrs, const,
                              ("sxm", "swn", "srm", "som", "N", "K", "K_SPLIT", "skb", "skh", "skn"),
                              num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


@pytest.mark.skipif(not HOPPER_OK, reason=HOPPER_WHY_NOT)
def test_kernel_compiles_for_hopper_with_pipelined_tensor_core_loop():
    """Compiled ahead of time for an H100/H200 (``compile_decode_linear_for_hopper``), every
    epilogue and split at the default tiles: compiles, issues asynchronous copies (a
    multi-stage software pipeline) and Hopper's warp-group MMA."""
    # split: SPLIT_K programs per tile; 0: the stream-K kernel; folded: the norm weight in w (SCALE_X off)
    for norm, resid, swiglu, qkv, split, folded in [
            (True, False, False, False, 1, False), (False, True, False, False, 2, False),
            (True, False, True, False, 1, False), (True, True, True, False, 3, False),
            (True, False, False, True, 1, False), (True, False, False, True, 2, False),
            (False, True, False, False, 0, False), (True, False, True, False, 0, False),
            (True, False, False, True, 0, False), (True, False, True, False, 1, True),
            (True, False, False, True, 0, True)]:
        ir = compile_decode_linear_for_hopper(norm, resid, swiglu, qkv, split, folded).asm["ttgir"]
        assert "async_copy_global_to_local" in ir, (norm, resid, swiglu, qkv, split)
        assert "warp_group_dot" in ir, (norm, resid, swiglu, qkv, split)


@pytest.mark.skipif(not HOPPER_OK, reason=HOPPER_WHY_NOT)
def test_compile_sees_only_outputs_and_counters_written():
    """torch.compile decides from the kernel's TTIR which arguments it writes, and clones
    what it believes written (or every argument if the analysis fails). It must find only the
    output, the split-K workspaces, the counters and (the projection with RoPE) the K/V
    caches: a weight or the residual stream in that list could be copied on every call. Uses
    torch's private analysis (the call a traced ``wrap_triton`` makes); skipped if neither of its known names exists."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    if not (hasattr(tkw, "identify_mutated_tensors") or hasattr(tkw, "identify_accessed_tensors")):
        pytest.skip(f"torch {torch.__version__} has neither identify_mutated_tensors nor identify_accessed_tensors")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", MUTATION_CHECK], env=env, capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    written = json.loads(res.stdout.strip().splitlines()[-1])
    sk_plain, sk_norm = ["Locks", "Out", "Work"], ["Locks", "Out", "SSWork", "Work"]
    assert written == {"2-False-False": ["Locks", "Out", "Work"], "1-True-False": ["Out"],
                       "3-True-False": ["Locks", "Out", "SSWork", "Work"], "1-True-True": ["Kc", "Out", "Vc"],
                       "2-True-True": ["Kc", "Locks", "Out", "SSWork", "Vc", "Work"],
                       # stream-K: any tile may be cut, so every call may write the workspaces and counters
                       "sk-False-False": sk_plain, "sk-True-False": sk_norm,
                       "sk-True-True": ["Kc", "Locks", "Out", "SSWork", "Vc", "Work"]}, written


@pytest.mark.skipif(not HOPPER_OK, reason=HOPPER_WHY_NOT)
@pytest.mark.parametrize("pdl", [None, "prefetch"])
def test_compiled_fused_step_runs_in_place(pdl):
    """The decode step as inductor compiles it for a Hopper GPU (on CPU: a Triton target
    without a device, stopped before code generation): 4 kernels per fused block plus the
    head, each writing its output, counters and (the projection's) K/V cache columns in place:
    no functional kernel left, no clone of a weight, the residual stream, the caches or the
    counters (the counters' only copy is onto themselves, which inductor drops); the K/V
    index_put_ of the unfused step are gone. With PDL launches (infer/pdl.py) the same holds for
    the opaque custom ops that replace the kernels: reinplaced, none left functionalised."""
    import torch._inductor.compile_fx as compile_fx

    if not hasattr(compile_fx, "_recursive_post_grad_passes"):
        pytest.skip(f"torch {torch.__version__} has no compile_fx._recursive_post_grad_passes to read the graph from")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    names = ["debug-cat", "debug-cat-adaptive", "debug-hybrid"]
    args = [*([f"pdl={pdl}"] if pdl else []), *names]
    res = subprocess.run([sys.executable, "-c", STEP_GRAPH_CHECK, *args], env=env, capture_output=True, text=True,
                         timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    for name in names:
        r, plain = out[name]["fused"], out[name]["unfused"]
        n_fused = sum(r["fused"])
        if pdl:  # the custom ops' last argument: the mode
            assert r["kernels"] == 0 and r["pdl_ops"] == 4 * n_fused + 1 and r["modes"] == [pdl], r
        else:
            assert r["kernels"] == 4 * n_fused + 1 and r["pdl_ops"] == 0, r
        assert r["functional"] == r["clones"] == r["other_copies"] == r["index_put_copying"] == 0, r
        assert r["auto_functionalized"] == 0, r
        # each fused block writes its K and V in its projection kernel instead of two index_put_
        assert r["index_put_inplace"] == plain["index_put_inplace"] - 2 * n_fused, (r, plain)
        assert plain["kernels"] == 0 and plain["clones"] == plain["index_put_copying"] == 0, plain


@pytest.fixture
def fresh_tuned(monkeypatch):
    """decode_linear.TUNED empty for the test and restored after it (tuned tiles are global)."""
    from cat_titan.infer import decode_linear as dl

    monkeypatch.setattr(dl, "TUNED", {})


@pytest.mark.skipif(triton is None, reason="triton is not installed: decode_linear has no tiles to choose")
def test_tuned_tiles_from_the_sweep_apply_to_their_shapes_only(tmp_path, fresh_tuned):
    """bench_attention --decode-linear --write-config picks each linear's fastest fused row;
    load_tuned_configs makes it the launch's setting for that exact shape (rows, N, K,
    SwiGLU, qkv), the heuristic stays elsewhere, an explicit config still wins, and a bad
    file is refused with the fix, leaving the loaded tiles as they were."""
    import importlib.util

    from cat_titan.infer import decode_linear as dl

    spec = importlib.util.spec_from_file_location("bench_attention", ROOT / "tools" / "bench_attention.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = lambda **kw: dict(dict(BM=64, BN=32, BK=128, SPLIT_K=1, PROGRAMS=0, num_warps=4, num_stages=3), **kw)
    rows = [dict(linear="w2 + residual", M=64, N=1536, K=4096, swiglu=False, qkv=False, variant="unfused", us=8.0),
            dict(linear="w2 + residual", M=64, N=1536, K=4096, swiglu=False, qkv=False, variant="fused",
                 us=9.0, **cfg(SPLIT_K=2)),
            dict(linear="w2 + residual", M=64, N=1536, K=4096, swiglu=False, qkv=False, variant="fused",
                 us=6.5, **cfg(BN=128, PROGRAMS=132)),
            dict(linear="w2 + residual", variant="fused", error="out of resources", **cfg(BN=256)),
            dict(linear="qkv", M=64, N=4608, K=1536, swiglu=False, qkv=True, variant="unfused", us=7.0),
            dict(linear="qkv", M=64, N=4608, K=1536, swiglu=False, qkv=True, variant="fused", us=7.5,
                 **cfg(BN=64, BK=64, PROGRAMS=264))]
    entries = bench.tuned_entries(rows)
    assert ([(e["linear"], e["us"], e["unfused_us"]) for e in entries]
            == [("w2 + residual", 6.5, 8.0), ("qkv", 7.5, 7.0)])
    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"device": "test", "entries": entries}))
    assert dl.load_tuned_configs(path) == 2
    assert dl.resolve_config(64, 1536, 4096, False, 132) == cfg(BN=128, PROGRAMS=132)
    assert dl.resolve_config(64, 4608, 1536, False, 132, hd=64) == cfg(BN=64, BK=64, PROGRAMS=264)
    # other rows, or the same N/K as a plain linear rather than the qkv projection: the heuristic
    assert dl.resolve_config(32, 1536, 4096, False, 132) == dl.linear_config(32, 1536, 4096, False, 132)
    assert dl.resolve_config(64, 4608, 1536, False, 132) == dl.linear_config(64, 4608, 1536, False, 132)
    assert dl.resolve_config(64, 1536, 4096, False, 132, config=dict(PROGRAMS=0))["PROGRAMS"] == 0
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"entries": [{"M": 64, "N": 8}]}))
    with pytest.raises(ValueError, match="bad.json.*--write-config"):
        dl.load_tuned_configs(bad)
    assert len(dl.TUNED) == 2


@pytest.mark.skipif(triton is None, reason="triton is not installed: decode_linear has no tiles to choose")
def test_the_h200_sweep_in_docs_loads_and_covers_every_cat150m_linear(fresh_tuned):
    """docs/tuned/ keeps session 14's H200 sweep (what --linear-config takes): it must stay
    readable and hold one entry per fused linear of cat-150m at batch 64."""
    from cat_titan.infer import decode_linear as dl

    assert dl.load_tuned_configs(ROOT / "docs" / "tuned" / "decode_linear_h200_cat150m_batch64.json") == 6
    assert set(dl.TUNED) == {(64, 4608, 1536, False, True), (64, 4096, 1536, True, False),
                             (64, 1536, 4096, False, False), (64, 1536, 1536, False, False),
                             (64, 32000, 1536, False, False), (64, 4608, 1536, False, False)}


@pytest.mark.parametrize("path", ["fused", "lean"])
@pytest.mark.parametrize("name", ["debug-cat", "debug-dense", "debug-hybrid"])
def test_cpu_fused_runner_with_folded_norms_follows_the_weights(name, path):
    """fuse_linears(fold_norms=True) off CUDA: the reference path with the norm weights folded
    into wqkv, w1|w3 and the head gives greedy decoding by full forward passes (tokens equal,
    logits to 1e-4: the weights are rounded once more). After the model's norm and head
    weights change in place, the next generation refolds and follows the changed model. The
    same for lean_linears(fold_norms=True) (decode_block.py; the head is not folded there)."""
    from cat_titan.models.common import RMSNorm

    from .util import greedy_by_full_forward, perturbed

    model = perturbed(name)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (4, 9)]
    runner = make_runner(model, 2, 9 + 10, model.args.chunk_size)
    if path == "fused":
        fused = runner.fuse_linears(fold_norms=True)
        assert any(fused) and runner._folded_head is not None
    else:
        lean = runner.lean_linears(fold_norms=True)
        assert any(lean) and runner._folded_qkv[lean.index(True)] is not None
    for change in (False, True):
        if change:
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, RMSNorm):
                        m.weight.mul_(torch.linspace(0.5, 1.5, m.weight.numel()))
                model.head.output.weight.mul_(1.25)
        steps = list(stream(model, prompts, 10, runner=runner))
        tokens = torch.stack([s.tokens for s in steps], 1)
        logits = torch.stack([s.logits for s in steps], 1)
        for b, p in enumerate(prompts):
            want, want_logits = greedy_by_full_forward(model, p, 10)
            assert tokens[b].tolist() == want, (change, b)
            assert (logits[b] - want_logits).abs().max().item() <= 1e-4, (change, b)


@pytest.mark.parametrize("name,chunk", [("debug-cat", None), ("debug-cat-adaptive", 2), ("debug-dense", None),
                                        ("debug-hybrid", None), ("debug-cat-layer", None)])
def test_cpu_fused_runner_computes_the_unfused_step(name, chunk):
    """Off CUDA ``fuse_linears`` routes the blocks through decode_linear's reference, which
    is the model's own modules: the same tokens and logits bit for bit."""
    model = debug_model(name)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (4, 9, 14)]
    C = chunk or model.args.chunk_size
    plain = list(stream(model, prompts, 14, chunk_size=chunk, runner=make_runner(model, 3, 14 + 14, C)))
    runner = make_runner(model, 3, 14 + 14, C)
    fused = runner.fuse_linears()
    if name == "debug-cat-layer":
        assert fused == [False] * len(model.layers)  # CAT-as-a-layer blocks keep their own attention
    steps = list(stream(model, prompts, 14, chunk_size=chunk, runner=runner))
    for a, b in zip(steps, plain):
        assert torch.equal(a.tokens, b.tokens)
        assert torch.equal(a.logits, b.logits)
    assert generate(model, prompts, 14, chunk_size=chunk, runner=runner) == [s.tolist() for s in
                                                                              torch.stack([p.tokens for p in plain], 1)]


# cat-150m's decode linears at batch 64 (M, N, K, norm, residual, swiglu): wqkv, wo, w1|w3, w2, head
CUDA_SHAPES = [(64, 4608, 1536, True, False, False), (64, 1536, 1536, False, True, False),
               (64, 4096, 1536, True, False, True), (64, 1536, 4096, False, True, False),
               (64, 32000, 1536, True, False, False), (320, 1536, 4096, False, True, False),
               (7, 1536, 1536, False, True, False)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sched", ["default", "stream-k", "folded"])
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: "x".join(map(str, s[:3])))
def test_cuda_kernel_bf16_within_the_unfused_error(shape, sched):
    """bf16 at the reference-sized model's shapes (split-K where the heuristic picks it; or
    stream-K over one program per SM, BN = 64, so programs share cut tiles under real
    concurrency; or the norm weight folded into the weight): against the float32 definition,
    no further off than the unfused bf16 ops; bitwise repeatable (partials are summed in a
    fixed order); counters reset."""
    from cat_titan.infer.decode_linear import (decode_linear, fold_norm_weight, launch_decode_linear, linear_config,
                                               make_locks, reference_decode_linear)
    from cat_titan.models.common import RMSNorm

    M, N, K, norm_on, resid, swiglu = shape
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(M, K, device=dev, dtype=bf)
    w = (torch.randn((2 if swiglu else 1) * N, K, device=dev) / K ** 0.5).to(bf)
    res = torch.randn(M, N, device=dev, dtype=bf) if resid else None
    norm_bf = norm = None
    if norm_on:  # the bf16 model's norm, and the same weights in float32
        norm_bf = RMSNorm(K).to(dev, bf).requires_grad_(False)
        norm_bf.weight.copy_(torch.rand(K, device=dev) + 0.5)
        norm = RMSNorm(K).to(dev).requires_grad_(False)
        norm.weight.copy_(norm_bf.weight.float())
    locks = make_locks(dev)
    with torch.no_grad():
        exact = reference_decode_linear(x.float(), w.float(), norm, None if res is None else res.float(), swiglu)
        unfused = reference_decode_linear(x, w, norm_bf, res, swiglu).float()
        if sched == "default":
            out = decode_linear(x, w, locks, norm_bf, res, swiglu)
            again = decode_linear(x, w, locks, norm_bf, res, swiglu)
        elif sched == "folded":
            if norm_bf is None:
                pytest.skip("no norm before this linear: nothing to fold")
            wf = fold_norm_weight(w, norm_bf.weight)
            out = decode_linear(x, wf, locks, norm_bf, res, swiglu, norm_in_w=True)
            again = decode_linear(x, wf, locks, norm_bf, res, swiglu, norm_in_w=True)
        else:
            sms = torch.cuda.get_device_properties(0).multi_processor_count
            run = lambda: launch_decode_linear(x, w, None if norm_bf is None else norm_bf.weight, res, locks, 1e-5,
                                               swiglu, dict(PROGRAMS=sms, BN=64))
            out, again = run(), run()
    assert out.dtype == bf and out.shape == (M, N)
    err, unfused_err = (out.float() - exact).abs().max().item(), (unfused - exact).abs().max().item()
    assert err <= max(1.5 * unfused_err, 1e-3), (err, unfused_err, linear_config(M, N, K, swiglu, 132))
    assert torch.equal(out, again)
    assert int(locks.abs().sum()) == 0



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T,G", [(1, 1), (2, 1), (1, 4)])
def test_cuda_qkv_kernel_bf16_within_the_unfused_error(T, G):
    """The projection with RoPE and K/V writes at cat-150m's width (24 KV heads x 64 for G=1),
    bf16, against the float32 definition: q and the caches no further off than the unfused
    bf16 ops, and only the rows' own columns written."""
    from cat_titan.infer.decode_linear import decode_qkv, make_locks, reference_decode_qkv
    from cat_titan.models.common import RMSNorm, rope_table

    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    B, D, hd, n_cols = 64, 1536, 64, 97
    Hkv = 24 // G
    M = B * T
    x = torch.randn(M, D, device=dev, dtype=bf)
    w = (torch.randn(Hkv * (G + 2) * hd, D, device=dev) / D ** 0.5).to(bf)
    norm_bf = RMSNorm(D).to(dev, bf).requires_grad_(False)
    norm_bf.weight.copy_(torch.rand(D, device=dev) + 0.5)
    norm = RMSNorm(D).to(dev).requires_grad_(False)
    norm.weight.copy_(norm_bf.weight.float())
    cos_t, sin_t = rope_table(hd, 64, 10000.0, device=dev)
    ids = torch.randint(0, 64, (M,), device=dev)
    cos, sin = cos_t[ids], sin_t[ids]
    cols = torch.stack([torch.randperm(n_cols, device=dev)[:T] for _ in range(B)]).reshape(M)
    caches = [torch.randn(B, Hkv, n_cols, hd, device=dev, dtype=bf) for _ in range(2)]
    exact_c = [c.float() for c in caches]
    unfused_c = [c.clone() for c in caches]
    fused_c = [c.clone() for c in caches]
    with torch.no_grad():
        exact = reference_decode_qkv(x.float(), w.float(), norm, *exact_c, cos, sin, cols, T, G)
        unfused = reference_decode_qkv(x, w, norm_bf, *unfused_c, cos, sin, cols, T, G).float()
        out = decode_qkv(x, w, make_locks(dev), norm_bf, *fused_c, cos, sin, cols, T, G)
    assert out.shape == exact.shape and out.dtype == bf
    for got, ref, want in [(out, unfused, exact)] + list(zip(fused_c, unfused_c, exact_c)):
        err, unfused_err = (got.float() - want).abs().max().item(), (ref.float() - want).abs().max().item()
        assert err <= max(1.5 * unfused_err, 1e-3), (err, unfused_err)
    untouched = torch.ones(B, n_cols, dtype=torch.bool, device=dev)
    untouched[torch.arange(M, device=dev) // T, cols] = False
    for got, before in zip(fused_c, caches):
        assert torch.equal(got.permute(0, 2, 1, 3)[untouched], before.permute(0, 2, 1, 3)[untouched])


@pytest.mark.skipif(triton is None, reason="triton is not installed: no kernel source to embed")
def test_kernel_sources_inductor_embeds_have_no_backslash():
    """torch.compile pastes a user kernel's source (and the jit functions it calls) into its
    generated module inside a string literal; torch 2.11 does not escape it, so a backslash
    (e.g. a '\\n' in an inline-asm string) ends the literal: on an H100 (session 13) the fused
    step failed to compile with "unterminated string literal"."""
    wrapper = pytest.importorskip("torch._inductor.codegen.wrapper")
    closure = getattr(wrapper, "user_defined_triton_kernel_transitive_closure_source_code", None)
    if closure is None:
        pytest.skip(f"torch {torch.__version__} has no user_defined_triton_kernel_transitive_closure_source_code")
    from cat_titan.infer import decode_attention as da
    from cat_titan.infer import decode_linear as dl

    for kernel in (dl._decode_linear_kernel, dl._decode_linear_sk_kernel, da._decode_kernel):
        src = closure(kernel)
        assert "inline_asm_elementwise" in src or kernel is da._decode_kernel  # the closure reaches the helpers
        assert "\\" not in src, (kernel.fn.__name__, [line for line in src.splitlines() if "\\" in line])
