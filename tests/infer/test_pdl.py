"""Programmatic dependent launch (cat_titan.infer.pdl) for the decode kernels.

Without a GPU: the kernels compiled for sm_90 (ptxas from triton's wheel) with PDL on wait for
the previous grid before any global load, store or atomic, allow the next grid only after that
wait, and (mode 'prefetch') issue their bulk L2 prefetches of the weight before it; with PDL
off the code has no grid dependency control at all. The modes are validated before any work,
CPU tensors never take the PDL ops, and the opaque ops' fake implementations give the real
shapes (what torch.compile plans with; test_decode_linear.py checks that the compiled step
runs them in place), and the device-support query is a trace-time constant. On CUDA: generation
with PDL launches equals the unfused eager tokens, eager and in CUDA graphs (fp32, logits to
1e-4 as test_generate_cuda.py).
"""

import os
import re

import pytest
import torch

from cat_titan.infer import pdl
from cat_titan.infer.decode_linear import decode_linear, make_locks, reference_decode_linear, triton
from cat_titan.models.common import RMSNorm

from .test_decode_linear import HOPPER_OK, HOPPER_WHY_NOT, compile_decode_linear_for_hopper, compile_for_hopper

# a global memory access in PTX: asynchronous copies to shared memory, loads, stores, atomics
_GLOBAL = re.compile(r"cp\.async\.c[ag]\.|ld\.global|st\.global|atom\.|red\.global|cp\.async\.bulk\.tensor")


@pytest.fixture(autouse=True)
def restore_mode():
    old = pdl._mode
    yield
    pdl._mode = old


def _ptx_order(ptx: str) -> dict:
    """Line numbers of the first grid-dependency wait and launch, the first global access, the
    last streaming copy (``cp.async``: the main loops' pipelined loads) and plain load, the first
    global store and the bulk L2 prefetches (in the PTX's text order: the kernels' prologues are straight-line)."""
    lines = ptx.splitlines()
    first = lambda pred: next((i for i, l in enumerate(lines) if pred(l)), None)
    every = lambda pred: [i for i, l in enumerate(lines) if pred(l)]
    copies = every(lambda l: re.search(r"cp\.async\.c[ag]\.shared\.global", l) is not None)
    return dict(wait=first(lambda l: "griddepcontrol.wait" in l),
                launch=first(lambda l: "griddepcontrol.launch_dependents" in l),
                launches=len(every(lambda l: "griddepcontrol.launch_dependents" in l)),
                access=first(lambda l: _GLOBAL.search(l) is not None),
                last_load=max(copies, default=None), store=first(lambda l: "st.global" in l),
                last_ld=max(every(lambda l: "ld.global" in l), default=None),
                prefetch=every(lambda l: "cp.async.bulk.prefetch.L2" in l))


@pytest.mark.skipif(not HOPPER_OK, reason=HOPPER_WHY_NOT)
@pytest.mark.parametrize("mode", pdl.MODES)
def test_decode_linear_for_hopper_waits_before_any_global_access(mode):
    # (swiglu, residual, qkv, split; 0: stream-K): every schedule, both epilogue families
    for swiglu, resid, qkv, split in [(True, False, False, 1), (False, True, False, 3), (True, False, False, 0),
                                      (False, False, True, 2), (False, False, True, 0)]:
        case = (swiglu, resid, qkv, split)
        at = _ptx_order(compile_decode_linear_for_hopper(True, resid, swiglu, qkv, split, pdl=pdl.trigger(mode),
                                                         prefetch=mode == "prefetch").asm["ptx"])
        assert at["access"] is not None, case
        if mode == "off":
            assert at["wait"] is None and at["launch"] is None and not at["prefetch"], (case, at)
            continue
        assert at["wait"] is not None and at["wait"] < at["access"], (case, at)
        assert at["wait"] < at["launch"] and at["launches"] == 1, (case, at)  # never more than one grid ahead
        if mode == "late":  # after the weight is streamed; with split-K before the first store
            assert at["launch"] > at["last_load"], (case, at)
            if split:
                assert at["launch"] < at["store"], (case, at)
        else:
            assert at["launch"] < at["last_load"], (case, at)
        if mode == "prefetch":  # w rows (and w3's with SwiGLU), all before the wait
            assert len(at["prefetch"]) == (2 if swiglu else 1), (case, at)
            assert max(at["prefetch"]) < at["wait"], (case, at)
        else:
            assert not at["prefetch"], (case, at)


@pytest.mark.skipif(not HOPPER_OK, reason=HOPPER_WHY_NOT)
@pytest.mark.parametrize("mode", ["off", "wait", "late"])
def test_decode_attention_for_hopper_waits_before_any_global_access(mode):
    from cat_titan.infer.decode_attention import _decode_kernel, kernel_config

    cfg = kernel_config(64, 300)
    ptrs = dict(Q="*bf16", K="*bf16", V="*bf16", Lens="*i64", Out="*bf16")
    const = dict(sq_d=1, sk_d=1, sv_d=1, so_d=1, HKV=12, G=2, T=1, HD=64, BLOCK_M=16, BLOCK_N=cfg["BLOCK_N"],
                 IEEE=False, SCALE=0.125, PDL=pdl.trigger(mode))
    at = _ptx_order(compile_for_hopper(_decode_kernel, ptrs, const, num_warps=cfg["num_warps"],
                                       num_stages=cfg["num_stages"]).asm["ptx"])
    assert at["access"] is not None and not at["prefetch"], at
    if mode != "off":
        assert at["wait"] is not None and at["wait"] < at["access"] and at["wait"] < at["launch"], at
        # 'late': after the last K/V load (the kernel loads with ld.global), before the output's store
        assert (at["last_ld"] < at["launch"] < at["store"]) if mode == "late" else at["launch"] < at["last_ld"], at
    else:
        assert at["wait"] is None and at["launch"] is None, at


def test_modes_are_checked_before_any_work(monkeypatch):
    with pytest.raises(ValueError, match="unknown PDL mode 'fast'.*off, wait, prefetch, late"):
        pdl.set_mode("fast")
    pdl._mode = None
    monkeypatch.setenv(pdl.ENV, "yes")
    with pytest.raises(ValueError, match=f"environment variable {pdl.ENV}.*'yes'"):
        pdl.mode()
    monkeypatch.setenv(pdl.ENV, "prefetch")
    assert pdl.mode() == "prefetch"
    pdl.set_mode("off")
    assert pdl.mode() == "off"


@pytest.mark.skipif(triton is None, reason="triton is not installed: no kernel launcher to check")
def test_launcher_refuses_bad_pdl_arguments():
    from cat_titan.infer.decode_linear import launch_decode_linear

    x, w = torch.randn(4, 32), torch.randn(16, 32)
    with pytest.raises(ValueError, match="unknown PDL mode 'on'"):
        launch_decode_linear(x, w, None, None, make_locks("cpu"), 1e-5, False, pdl_mode="on")
    with pytest.raises(ValueError, match="cannot go through torch.compile's wrap_triton"):
        launch_decode_linear(x, w, None, None, make_locks("cpu"), 1e-5, False, pdl_mode="wait", wrap=lambda k: k)


def test_cpu_tensors_never_take_the_pdl_ops():
    """With a mode on, CPU tensors still compute the model's own ops (exactly)."""
    pdl.set_mode("prefetch")
    if not torch.cuda.is_available():
        assert pdl.supported()[0] is False and "no CUDA device" in pdl.supported()[1]
    x, w, res = torch.randn(5, 48), torch.randn(64, 48), torch.randn(5, 32)
    norm = RMSNorm(48).requires_grad_(False)
    norm.weight.copy_(torch.rand(48) + 0.5)
    assert not pdl.active(x)
    got = decode_linear(x, w, make_locks("cpu"), norm=norm, residual=res, swiglu=True)
    assert torch.equal(got, reference_decode_linear(x, w, norm, res, swiglu=True))


@pytest.mark.skipif(triton is None, reason="triton is not installed: the PDL ops are not registered")
def test_pdl_ops_fake_shapes_are_the_kernels_outputs():
    """torch.compile plans the opaque ops from these: the outputs' shapes and dtypes."""
    import cat_titan.infer.decode_attention  # noqa: F401  (registers decode_attention_pdl)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, locks = torch.empty(6, 96, dtype=torch.bfloat16), torch.zeros(1024, dtype=torch.int32)
        w = torch.empty(2 * 80, 96, dtype=torch.bfloat16)
        assert torch.ops.cat_titan.decode_linear_pdl(x, w, None, None, locks, 1e-5, True, False,
                                                     "prefetch").shape == (6, 80)
        assert torch.ops.cat_titan.decode_linear_pdl(x, w, None, x.new_empty(6, 160), locks, 1e-5, False, False,
                                                     "late").shape == (6, 160)
        # qkv: 2 KV heads of 16, 3 q heads each (G = 3): q is (M, 2 * 3 * 16)
        wqkv = torch.empty(2 * (3 + 2) * 16, 96, dtype=torch.bfloat16)
        kc = vc = torch.empty(3, 2, 9, 16, dtype=torch.bfloat16)
        cos = torch.empty(6, 16)
        q = torch.ops.cat_titan.decode_qkv_pdl(x, wqkv, None, locks, kc, vc, cos, cos,
                                               torch.zeros(6, dtype=torch.long), 1e-5, 2, 3, False, "wait")
        assert q.shape == (6, 96) and q.dtype == torch.bfloat16
        qh = torch.empty(3, 6, 2, 16, dtype=torch.bfloat16).transpose(1, 2)  # (B, Hq, T, hd), not contiguous
        out = torch.ops.cat_titan.decode_attention_pdl(qh, kc, vc, torch.ones(3, 2, dtype=torch.long), "late")
        assert out.shape == (3, 2, 6, 16) and out.is_contiguous()


@pytest.mark.skipif(triton is None, reason="triton is not installed: the PDL ops are not registered")
def test_pdl_ops_reach_their_launchers_and_refuse_a_cpu_tensor_by_name():
    """The real ops (not their fakes), on CPU: each one's arguments must reach the launcher,
    which refuses a PDL launch off CUDA before any kernel runs. (Session 13 renamed the
    launcher's keyword and left decode_linear_pdl passing the old one: a TypeError that only
    a GPU run would have shown.)"""
    import cat_titan.infer.decode_attention  # noqa: F401  (registers decode_attention_pdl)

    x, locks = torch.zeros(6, 96), torch.zeros(1024, dtype=torch.int32)
    w = torch.zeros(2 * 80, 96)
    with pytest.raises(ValueError, match=r"decode_linear: a PDL launch \(mode 'prefetch'\).*input is on cpu"):
        torch.ops.cat_titan.decode_linear_pdl(x, w, None, None, locks, 1e-5, True, False, "prefetch")
    with pytest.raises(ValueError, match=r"decode_linear: a PDL launch \(mode 'late'\).*input is on cpu"):
        torch.ops.cat_titan.decode_linear_pdl(x, w, None, None, locks, 1e-5, False, False, "late")
    wqkv = torch.zeros(2 * (3 + 2) * 16, 96)
    kc, vc = torch.zeros(3, 2, 9, 16), torch.zeros(3, 2, 9, 16)
    with pytest.raises(ValueError, match=r"decode_linear: a PDL launch \(mode 'wait'\).*input is on cpu"):
        torch.ops.cat_titan.decode_qkv_pdl(x, wqkv, None, locks, kc, vc, torch.ones(6, 16), torch.zeros(6, 16),
                                           torch.zeros(6, dtype=torch.long), 1e-5, 2, 3, False, "wait")
    q = torch.zeros(3, 6, 2, 16).transpose(1, 2)
    with pytest.raises(ValueError,
                       match=r"decode attention: a PDL launch \(mode 'wait'\) needs a CUDA device.*input is on cpu"):
        torch.ops.cat_titan.decode_attention_pdl(q, kc, vc, torch.ones(3, 2, dtype=torch.long), "wait")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("exact_matmuls")
@pytest.mark.parametrize("mode", ["wait", "prefetch", "late"])
@pytest.mark.parametrize("graphs", [None, "graphs"])
@pytest.mark.parametrize("name,chunk", [("debug-cat", None), ("debug-cat-adaptive", 4), ("debug-hybrid", None)])
def test_cuda_generation_with_pdl_equals_eager(name, chunk, graphs, mode):
    from .test_generate_cuda import check_runner_generation

    ok, why = pdl.supported()
    if not ok:
        pytest.skip(f"PDL not supported here: {why}")
    # PDL on after the reference: it runs without any PDL launch
    check_runner_generation(name, chunk, graphs, after_reference=lambda: pdl.set_mode(mode))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("exact_matmuls")
@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("mode", ["wait", "late"])
@pytest.mark.parametrize("name,chunk", [("debug-cat", None), ("debug-dense", None), ("debug-hybrid", None)])
def test_cuda_unfused_generation_with_pdl_equals_eager(name, chunk, mode, lean):
    """The unfused step as ``bench_generate --pdl`` runs it, in CUDA graphs: inductor's own
    kernels with its PDL switch; lean=True with the lean blocks (their kernels launch without
    PDL); lean=False, the model's ops with the decode attention kernel's PDL launches."""
    import torch._inductor.config as inductor_config

    from .test_generate_cuda import check_runner_generation

    ok, why = pdl.supported()
    if not ok:
        pytest.skip(f"PDL not supported here: {why}")
    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip(f"torch {torch.__version__}: inductor has no triton.enable_pdl")
    with inductor_config.patch({"triton.enable_pdl": True}):
        check_runner_generation(name, chunk, "graphs", after_reference=lambda: pdl.set_mode(mode), fuse=False,
                                default_lean=lean)


def test_device_support_is_a_constant_in_a_compiled_step(monkeypatch):
    """decode_linear asks pdl.active() inside the traced decode step: the device query runs
    eagerly at trace time (no graph break, no CUDA call in the graph) and the compiled step
    keeps its answer."""
    calls = []

    def fake_supported(index):  # with a call dynamo cannot trace, as the CUDA queries it stands for
        with open(os.devnull) as f:
            f.read()
        calls.append(index)
        return True, ""

    monkeypatch.setattr(pdl, "supported", fake_supported)
    monkeypatch.setattr(pdl, "_SUPPORTED", {})
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    step = torch.compile(lambda x: x + 1 if pdl._supported_index(3) else x - 1, backend=backend, fullgraph=True)
    assert torch.equal(step(torch.zeros(2)), torch.ones(2)) and torch.equal(step(torch.ones(2)), 2 * torch.ones(2))
    assert calls == [3] and len(graphs) == 1
