"""The lean decode block (cat_titan/infer/decode_block.py) computes the model's decode step.

* Its two Triton kernels in Triton's interpreter on CPU (float32), against their references:
  ``rope_attention`` (RoPE + K/V cache writes + attention; 1-2 queries per row, GQA groups
  1-4, head dims 16-64, with and without the folded norm's row scale; the caches must equal
  the reference's, and columns no query may see hold NaN) and ``swiglu_rows``; tolerance 2e-5
  (fp32 sums in other orders, values of order 1-10).
* The references themselves against independent computations (the model's modules).
* Generation through lean runners, eager and compiled by inductor on CPU, with and without
  folded norms, against the default runner and greedy decoding by full forward passes
  (tokens equal; logits to 1e-4); the compiled step updates the residual stream in place
  (no copy around ``residual_linear_``). After the weights change in place, the folded
  weights are refolded.
* Generation with the kernels interpreted inside the lean runner.
* Without a GPU: the kernels compiled for sm_90, torch.compile's view of what they write,
  and their sources as inductor embeds them.
On CUDA: test_generate_cuda.py.
"""

import json
import textwrap
from pathlib import Path

import pytest
import torch

from cat_titan.infer import make_runner, stream
from cat_titan.infer.decode_block import (reference_rope_attention, reference_swiglu_rows, residual_linear_,
                                          rope_attention_supports)
from cat_titan.models.common import RMSNorm, apply_rope

from .. import interpreter
from ..hopper import HOPPER_OK, HOPPER_WHY_NOT
from ..interpreter import INTERPRETABLE, WHY_NOT
from .util import debug_model, greedy_by_full_forward, perturbed

ROOT = Path(__file__).resolve().parents[2]

# (B, Hkv, G, T, N, hd, fold)
SHAPES = [(2, 2, 1, 1, 40, 16, False), (3, 2, 2, 2, 70, 32, True), (2, 1, 4, 1, 9, 64, True),
          (2, 3, 2, 2, 130, 16, False), (1, 2, 1, 1, 33, 64, False)]

KERNEL_CHECK = textwrap.dedent("""
    import json, sys, torch
    from cat_titan.infer.decode_block import (launch_rope_attention, _rope_attention_kernel, reference_rope_attention,
                                              launch_swiglu_rows, _swiglu_rows_kernel, reference_swiglu_rows)
    torch.manual_seed(0)
    errors = []
    for B, Hkv, G, T, N, hd, fold in json.loads(sys.argv[1]):
        M, D = B * T, 24
        qkv = torch.randn(M, Hkv * (G + 2) * hd)
        x = torch.randn(M, D) * 3 if fold else None
        ang = torch.rand(M, hd // 2) * 6
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        # column-causal layout: row b's queries write at base_b + t and see up to their own column;
        # for T = 2 row 0's second query is a dummy that writes the last column and sees column 0
        base = torch.randint(0, N - T - 1, (B,))
        cols = (base[:, None] + torch.arange(T)).reshape(-1)
        lengths = cols + 1
        if T == 2:
            cols[1], lengths[1] = N - 1, 1
        k0, v0 = torch.randn(B, Hkv, N, hd), torch.randn(B, Hkv, N, hd)
        unseen = torch.arange(N)[None, :] > lengths.view(B, T).max(1).values[:, None] - 1  # (B, N)
        unseen[:, N - 1] = False  # the dummy's column is written, never read
        kr, vr, kk, vk = k0.clone(), v0.clone(), k0.clone(), v0.clone()
        hide = unseen[:, None, :, None].expand_as(k0)
        kk[hide], vk[hide] = float("nan"), float("nan")  # the kernel's copy only (SDPA's masking keeps NaN)
        want = reference_rope_attention(qkv, kr, vr, cos, sin, cols, lengths, T, G, x, 1e-5)
        got = launch_rope_attention(_rope_attention_kernel, qkv, kk, vk, cos, sin, cols, lengths, x, 1e-5, T, G)
        kr[hide], vr[hide] = float("nan"), float("nan")
        gap = lambda a, b: (a - b).abs().masked_fill(a.isnan() & b.isnan(), 0).nan_to_num(7.0).max().item()
        errors.append(max(gap(got, want), gap(kk, kr), gap(vk, vr)))
    for M, F, D in ((3, 40, 24), (2, 1100, 1536)):
        gu, h = torch.randn(M, 2 * F), torch.randn(M, D) * 2
        got = launch_swiglu_rows(_swiglu_rows_kernel, gu, h, 1e-5, block_f=32)
        errors.append((got - reference_swiglu_rows(gu, h, 1e-5)).abs().max().item())
    print(json.dumps(errors))
""")


@pytest.mark.skipif(not INTERPRETABLE, reason=WHY_NOT)
def test_kernels_in_interpreter_equal_their_references():
    errors = interpreter.run(KERNEL_CHECK, json.dumps(SHAPES), timeout=300)
    assert len(errors) == len(SHAPES) + 2
    assert max(errors) <= 2e-5, errors  # NaN (a read of an unseen column) fails too


def test_reference_rope_attention_is_the_model_attention():
    """The reference against the model's ops written out: RoPE (apply_rope on (B, H, T, hd)),
    cache writes, softmax over each query's visible columns; with the row scale applied as
    RMSNorm with unit weight would before the projection (linearity: within fp32 rounding)."""
    torch.manual_seed(1)
    B, Hkv, G, T, N, hd, D = 2, 2, 2, 2, 12, 16, 10
    x = torch.randn(B * T, D)
    w = torch.randn(Hkv * (G + 2) * hd, D) * 0.3
    ang = torch.rand(B * T, hd // 2) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    cols = torch.tensor([3, 4, 7, 8])
    lengths = cols + 1
    k, v = torch.randn(B, Hkv, N, hd), torch.randn(B, Hkv, N, hd)
    k2, v2 = k.clone(), v.clone()
    out = reference_rope_attention(x @ w.T, k, v, cos, sin, cols, lengths, T, G, x, 1e-5)

    normed = RMSNorm(D, 1e-5)(x)
    qkv = (normed @ w.T).view(B, T, Hkv, G + 2, hd)
    rope = lambda t: apply_rope(t[None], cos.view(B, T, hd)[b], sin.view(B, T, hd)[b])[0]  # (T, hd)
    for b in range(B):
        for h in range(Hkv):
            for t in range(T):
                k2[b, h, cols[b * T + t]] = rope(qkv[b, :, h, G])[t]
                v2[b, h, cols[b * T + t]] = qkv[b, t, h, G + 1]
    assert torch.allclose(k, k2, atol=1e-5) and torch.allclose(v, v2, atol=1e-5)
    for b in range(B):
        for h in range(Hkv):
            for j in range(G):
                q = rope(qkv[b, :, h, j])  # (T, hd)
                for t in range(T):
                    n = int(lengths[b * T + t])
                    p = (q[t] @ k2[b, h, :n].T / hd ** 0.5).softmax(-1)
                    y = out.view(B, T, Hkv * G, hd)[b, t, h * G + j]
                    assert torch.allclose(y, p @ v2[b, h, :n], atol=1e-5)


def test_reference_swiglu_rows_and_residual_linear():
    torch.manual_seed(2)
    h, gu = torch.randn(3, 8), torch.randn(3, 10)
    r = RMSNorm(8, 1e-5)(h) / h  # the row scale, per element
    a, b = gu[:, :5] * r[:, :1], gu[:, 5:] * r[:, :1]
    assert torch.allclose(reference_swiglu_rows(gu, h, 1e-5), torch.nn.functional.silu(a) * b, atol=1e-6)
    x, y, w = torch.randn(3, 4), torch.randn(3, 6), torch.randn(4, 6)
    want = x + y @ w.T
    ptr = x.data_ptr()
    residual_linear_(x, y, w)
    assert x.data_ptr() == ptr and torch.allclose(x, want, atol=1e-6)


def test_kernel_supports():
    qkv, cache, cos = torch.zeros(2, 64), torch.zeros(2, 1, 8, 16), torch.zeros(2, 16)
    assert rope_attention_supports(qkv, cache, cos, 1, 2)
    assert not rope_attention_supports(qkv, cache, torch.zeros(2, 8), 1, 2)  # partial rotary width
    assert not rope_attention_supports(qkv, torch.zeros(2, 1, 8, 24), torch.zeros(2, 24), 1, 2)
    assert not rope_attention_supports(qkv.half(), cache, cos, 1, 2)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("name,chunk", [("debug-cat", None), ("debug-cat-adaptive", 2), ("debug-dense", None),
                                        ("debug-hybrid", None), ("debug-cat-layer", None)])
def test_lean_runner_generates_the_model_tokens(name, chunk, fold):
    """Lean blocks off CUDA (the references): greedy decoding by full forward passes, tokens
    equal and logits to 1e-4; unfolded, the default runner's logits to 1e-5 (the in-place
    residual GEMM rounds once instead of twice)."""
    model = debug_model(name)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (4, 9)]
    C = chunk or model.args.chunk_size
    runner = make_runner(model, 2, 9 + 12, C)
    lean = runner.lean_linears(fold_norms=fold)
    if name == "debug-cat-layer":
        assert lean == [False] * len(model.layers)
    else:
        assert any(lean) and (runner._folded_qkv[lean.index(True)] is not None) == fold
    steps = list(stream(model, prompts, 12, chunk_size=chunk, runner=runner))
    plain = list(stream(model, prompts, 12, chunk_size=chunk, runner=make_runner(model, 2, 9 + 12, C)))
    for a, b in zip(steps, plain):
        assert torch.equal(a.tokens, b.tokens)
        assert (a.logits - b.logits).abs().max().item() <= (1e-4 if fold else 1e-5)
    for b, p in enumerate(prompts):
        want, want_logits = greedy_by_full_forward(model, p, 12, chunk_size=chunk)
        assert torch.stack([s.tokens for s in steps], 1)[b].tolist() == want
        assert (torch.stack([s.logits for s in steps], 1)[b] - want_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["debug-cat", "debug-dense", "debug-hybrid"])
def test_lean_runner_with_folded_norms_follows_the_weights(name):
    """lean_linears(fold_norms=True) off CUDA: the reference path with the norm weights folded
    into wqkv and w1|w3 gives greedy decoding by full forward passes (tokens equal, logits to
    1e-4: the weights are rounded once more). After the model's norm and head weights change in
    place, the next generation refolds and follows the changed model."""
    model = perturbed(name)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 257, (n,), generator=g).tolist() for n in (4, 9)]
    runner = make_runner(model, 2, 9 + 10, model.args.chunk_size)
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


@pytest.mark.parametrize("fold", [False, True])
def test_compiled_lean_step_is_exact_and_updates_the_residual_in_place(fold):
    from cat_titan.infer.profiling import decode_graph_code

    model = debug_model("debug-cat-adaptive")
    prompts = torch.tensor([[5, 9, 2, 7, 1, 3], [4, 4, 8, 1, 0, 6]])
    runner = make_runner(model, 2, 64, 4)
    runner.lean_linears(fold_norms=fold)
    runner.compile_step()
    tokens, codes = decode_graph_code(model, runner, prompts, 7, chunk_size=4)
    eager = list(stream(model, prompts, 7, chunk_size=4))
    assert tokens == torch.stack([s.tokens for s in eager], 1).tolist()
    assert len(codes) == 2  # no chunk completes / every row completes
    for code in codes:
        calls = [line for line in code.splitlines() if "cat_titan.residual_linear_.default(" in line]
        assert len(calls) == 2 * len(model.layers), code
        # every call updates one buffer, the residual stream, itself: nothing copied it first
        assert len({c.split("(", 2)[2].split(",")[0] for c in calls}) == 1, calls
        assert "auto_functionalized" not in code


CHECK_GENERATION = textwrap.dedent("""
    import json, sys, torch
    import cat_titan.infer.decode_block as db
    from cat_titan.infer import make_runner, stream
    sys.path.insert(0, ".")
    from tests.infer.util import perturbed, greedy_by_full_forward
    db.use_kernel = lambda x: True  # CPU tensors through the interpreted kernels
    out = []
    for name, fold in json.loads(sys.argv[1]):
        model = perturbed(name)
        prompts = [[5, 9, 2, 7, 1], [4, 4, 8, 1, 0, 6, 3, 3, 1]]
        runner = make_runner(model, 2, 9 + 6, model.args.chunk_size)
        runner.lean_linears(fold_norms=fold)
        steps = list(stream(model, prompts, 6, runner=runner))
        tokens = torch.stack([s.tokens for s in steps], 1)
        logits = torch.stack([s.logits for s in steps], 1)
        for b, p in enumerate(prompts):
            want, want_logits = greedy_by_full_forward(model, p, 6)
            out.append([tokens[b].tolist() == want, (logits[b] - want_logits).abs().max().item()])
    print(json.dumps(out))
""")


@pytest.mark.skipif(not INTERPRETABLE, reason=WHY_NOT)
def test_generation_with_interpreted_kernels():
    out = interpreter.run(CHECK_GENERATION, json.dumps([["debug-cat", True], ["debug-dense", False]]), timeout=600)
    assert len(out) == 4
    for same, err in out:
        assert same and err <= 1e-4, out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("T", [1, 2])
def test_cuda_kernels_bf16_within_the_unfused_error(T, fold):
    """cat-150m's decoder shapes at batch 64, bf16: the kernels' distance from the float32
    references of the same inputs is at most twice (+1e-3) that of the references run in
    bf16 (the unfused path's ops: SDPA, bf16 RoPE and caches)."""
    from cat_titan.infer.decode_block import rope_attention, swiglu_rows

    torch.manual_seed(3)
    B, Hkv, G, N, hd, D = 64, 24, 1, 266, 64, 1536
    dev, bf = "cuda", torch.bfloat16
    qkv = torch.randn(B * T, Hkv * (G + 2) * hd, device=dev, dtype=bf)
    x = torch.randn(B * T, D, device=dev, dtype=bf) if fold else None
    ang = torch.rand(B * T, hd // 2, device=dev) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(bf), torch.cat([ang.sin()] * 2, -1).to(bf)
    cols = (torch.randint(0, N - 2, (B,), device=dev)[:, None] + torch.arange(T, device=dev)).reshape(-1)
    k, v = torch.randn(B, Hkv, N, hd, device=dev, dtype=bf), torch.randn(B, Hkv, N, hd, device=dev, dtype=bf)
    k16, v16, k32, v32 = k.clone(), v.clone(), k.float(), v.float()
    f32 = lambda t: None if t is None else t.float()
    want = reference_rope_attention(qkv.float(), k32, v32, cos.float(), sin.float(), cols, cols + 1, T, G, f32(x), 1e-5)
    ref16 = reference_rope_attention(qkv, k16, v16, cos, sin, cols, cols + 1, T, G, x, 1e-5)
    got = rope_attention(qkv, k, v, cos, sin, cols, cols + 1, T, G, x, 1e-5)
    err = lambda a, b: (a.float() - b).abs().max().item()
    for mine, theirs, exact in ((got, ref16, want), (k, k16, k32), (v, v16, v32)):
        assert err(mine, exact) <= 2 * err(theirs, exact) + 1e-3, (err(mine, exact), err(theirs, exact))
    gu, h = torch.randn(B * T, 8192, device=dev, dtype=bf), torch.randn(B * T, D, device=dev, dtype=bf)
    exact = reference_swiglu_rows(gu.float(), h.float(), 1e-5)
    assert err(swiglu_rows(gu, h, 1e-5), exact) <= 2 * err(reference_swiglu_rows(gu, h, 1e-5), exact) + 1e-3


COMPILE_CHECK = textwrap.dedent("""
    import json, torch
    from tests.hopper import activate, compile_for_hopper, written

    activate()
    from cat_titan.infer import decode_attention as da, decode_block as db

    bf, out = torch.bfloat16, {}
    t = lambda *s, dtype=bf: torch.zeros(*s, dtype=dtype)
    # cat-150m at batch 64: 24 KV heads of 64, 266 cache columns, qkv rows of 24 * 3 * 64
    for fold, T in ((False, 1), (True, 2)):
        kw = dict(QKV=t(64 * T, 4608), X=t(64 * T, 1536), Cos=t(64 * T, 64), Sin=t(64 * T, 64), K=t(64, 24, 266, 64),
                  V=t(64, 24, 266, 64), Cols=t(64 * T, dtype=torch.long), Lens=t(64 * T, dtype=torch.long),
                  Out=t(64 * T, 1536), D=1536, eps=1e-5, s_qkv=4608, s_x=1536, s_rope=64, sk_b=408576, sk_h=17024,
                  sk_n=64, sv_b=408576, sv_h=17024, sv_n=64, s_out=1536, HKV=24, G=1, T=T, HD=64, FOLD=fold,
                  BLOCK_D=1024, BLOCK_M=16, BLOCK_T=2, BLOCK_N=32, IEEE=False, SCALE=0.125)
        out[f"rope_attention-{fold}"] = written(db._rope_attention_kernel, kw)
        ptrs = {k: ("*i64" if k in ("Cols", "Lens") else "*bf16") for k, v in kw.items() if isinstance(v, torch.Tensor)}
        const = {k: v for k, v in kw.items() if k.isupper() and not isinstance(v, torch.Tensor)}
        compile_for_hopper(db._rope_attention_kernel, ptrs, const, num_warps=1, num_stages=2)
    kw = dict(GU=t(64, 8192), H=t(64, 1536), Out=t(64, 4096), F_=4096, D=1536, eps=1e-5, s_gu=8192, s_h=1536,
              s_out=4096, BLOCK_F=1024, BLOCK_D=2048)
    out["swiglu_rows"] = written(db._swiglu_rows_kernel, kw)
    compile_for_hopper(db._swiglu_rows_kernel, dict(GU="*bf16", H="*bf16", Out="*bf16"),
                       dict(BLOCK_F=1024, BLOCK_D=2048), num_warps=4)
    kw = dict(Q=t(64, 24, 1, 64), K=t(64, 24, 266, 64), V=t(64, 24, 266, 64), Lens=t(64, 1, dtype=torch.long),
              Out=t(64, 24, 1, 64), sq_b=1536, sq_h=64, sq_t=64, sq_d=1, sk_b=408576, sk_h=17024, sk_n=64, sk_d=1,
              sv_b=408576, sv_h=17024, sv_n=64, sv_d=1, sl_b=1, sl_t=1, so_b=1536, so_h=64, so_t=64, so_d=1,
              HKV=24, G=1, T=1, HD=64, BLOCK_M=16, BLOCK_N=32, IEEE=False, SCALE=0.125)
    out["decode_attention"] = written(da._decode_kernel, kw)
    compile_for_hopper(da._decode_kernel, dict(Q="*bf16", K="*bf16", V="*bf16", Lens="*i64", Out="*bf16"),
                       dict(sq_d=1, sk_d=1, sv_d=1, so_d=1, HKV=24, G=1, T=1, HD=64, BLOCK_M=16, BLOCK_N=32,
                            IEEE=False, SCALE=0.125), num_warps=1, num_stages=2)
    print(json.dumps(out))
""")


@pytest.mark.skipif(not HOPPER_OK, reason=HOPPER_WHY_NOT)
def test_kernels_compile_for_hopper_and_compile_sees_what_they_write():
    """Without a GPU: the kernels compile for sm_90 (ptxas from triton's wheel), and
    torch.compile's analysis of each (from its TTIR, through the shared ``attend_visible``)
    finds only the output and, for rope_attention, the K/V caches written: anything more
    would be cloned on every call."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", COMPILE_CHECK], env=env, capture_output=True, text=True, timeout=300,
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {
        "rope_attention-False": ["K", "Out", "V"], "rope_attention-True": ["K", "Out", "V"],
        "swiglu_rows": ["Out"], "decode_attention": ["Out"]}


def test_kernel_sources_inductor_embeds_have_no_backslash():
    """torch.compile pastes a user kernel's source (and the jit functions it calls) into its
    generated module inside a string literal; torch 2.11 does not escape it, so a backslash
    (e.g. a '\\n' in an inline-asm string) ends the literal: on an H100 (session 13) the fused
    decode step (since removed) failed to compile with "unterminated string literal"."""
    pytest.importorskip("triton", reason="triton is not installed: no kernel source to embed")
    wrapper = pytest.importorskip("torch._inductor.codegen.wrapper")
    closure = getattr(wrapper, "user_defined_triton_kernel_transitive_closure_source_code", None)
    if closure is None:
        pytest.skip(f"torch {torch.__version__} has no user_defined_triton_kernel_transitive_closure_source_code")
    from cat_titan.infer import decode_attention as da
    from cat_titan.infer import decode_block as db

    for kernel in (da._decode_kernel, db._rope_attention_kernel, db._swiglu_rows_kernel):
        src = closure(kernel)
        assert "def attend_visible" in src or kernel is db._swiglu_rows_kernel  # the closure reaches the helpers
        assert "\\" not in src, (kernel.fn.__name__, [line for line in src.splitlines() if "\\" in line])


def test_compile_step_takes_the_lean_path_only_where_none_was_chosen():
    """compile_step(lean=...): None runs the lean blocks on CUDA only, and only if
    runners.LEAN_BY_DEFAULT (on CUDA: test_generate_cuda.py), so on CPU the model's ops stay;
    True makes every fusable block lean, the others keep their ops; a path chosen before
    (lean with folded norms) is kept, and lean=False never changes one. torch.compile
    is lazy: nothing compiles here."""
    def runner(name, before=None, **kw):
        model = debug_model(name)
        r = make_runner(model, 2, 32, model.args.chunk_size)
        if before:
            before(r)
        r.compile_step(**kw)
        return r

    assert set(runner("debug-cat").decode_paths) == {"ops"}
    assert set(runner("debug-cat", lean=False).decode_paths) == {"ops"}
    assert set(runner("debug-cat", lean=True).decode_paths) == {"lean"}
    hybrid = runner("debug-hybrid", lean=True)
    assert set(hybrid.decode_paths) == {"lean", "ops"}
    assert all((p == "lean") == (k == "dense") for p, k in zip(hybrid.decode_paths, hybrid.kinds))
    assert set(runner("debug-cat-layer", lean=True).decode_paths) == {"ops"}  # CAT layers: not fusable
    for lean in (True, False):  # lean=True does not redo the path: the folded weights stay
        folded = runner("debug-cat", lambda r: r.lean_linears(fold_norms=True), lean=lean)
        assert set(folded.decode_paths) == {"lean"} and folded._folded_qkv[0] is not None
