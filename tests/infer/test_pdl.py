"""Programmatic dependent launch (cat_titan.infer.pdl) for the decode attention kernel.

Without a GPU: the kernel compiled for sm_90 (ptxas from triton's wheel) with PDL on waits for
the previous grid before any global load, store or atomic, and allows the next grid only after
that wait; with PDL off the code has no grid dependency control at all. The modes are validated
before any work, CPU tensors never take the PDL op, the opaque op's fake implementation gives
the real shape (what torch.compile plans with), and the device-support query is a trace-time
constant. On CUDA: generation
with PDL launches equals the unfused eager tokens, eager and in CUDA graphs (fp32, logits to
1e-4 as test_generate_cuda.py).
"""

import os
import re

import pytest
import torch

from cat_titan.infer import pdl
from cat_titan.infer.decode_attention import decode_attention, reference_decode_attention, triton

from ..hopper import HOPPER_OK, HOPPER_WHY_NOT, compile_for_hopper

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


def test_cpu_tensors_never_take_the_pdl_ops():
    """With a mode on, CPU tensors still compute the model's own ops (exactly)."""
    pdl.set_mode("prefetch")
    if not torch.cuda.is_available():
        assert pdl.supported()[0] is False and "no CUDA device" in pdl.supported()[1]
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    lengths = torch.tensor([[3], [9]])
    assert not pdl.active(q)
    assert torch.equal(decode_attention(q, k, v, lengths), reference_decode_attention(q, k, v, lengths))


@pytest.mark.skipif(triton is None, reason="triton is not installed: the PDL ops are not registered")
def test_pdl_ops_fake_shapes_are_the_kernels_outputs():
    """torch.compile plans the opaque ops from these: the outputs' shapes and dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        kc = vc = torch.empty(3, 2, 9, 16, dtype=torch.bfloat16)
        qh = torch.empty(3, 6, 2, 16, dtype=torch.bfloat16).transpose(1, 2)  # (B, Hq, T, hd), not contiguous
        out = torch.ops.cat_titan.decode_attention_pdl(qh, kc, vc, torch.ones(3, 2, dtype=torch.long), "late")
        assert out.shape == (3, 2, 6, 16) and out.is_contiguous()


@pytest.mark.skipif(triton is None, reason="triton is not installed: the PDL ops are not registered")
def test_pdl_ops_reach_their_launchers_and_refuse_a_cpu_tensor_by_name():
    """The real op (not its fake), on CPU: its arguments must reach the launcher, which
    refuses a PDL launch off CUDA before any kernel runs. (Session 13 renamed the launcher's
    keyword and left an op passing the old one: a TypeError that only a GPU run would have shown.)"""
    kc, vc = torch.zeros(3, 2, 9, 16), torch.zeros(3, 2, 9, 16)
    q = torch.zeros(3, 6, 2, 16).transpose(1, 2)
    with pytest.raises(ValueError,
                       match=r"decode attention: a PDL launch \(mode 'wait'\) needs a CUDA device.*input is on cpu"):
        torch.ops.cat_titan.decode_attention_pdl(q, kc, vc, torch.ones(3, 2, dtype=torch.long), "wait")


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
        check_runner_generation(name, chunk, "graphs", after_reference=lambda: pdl.set_mode(mode),
                                default_lean=lean)


def test_device_support_is_a_constant_in_a_compiled_step(monkeypatch):
    """decode_attention asks pdl.active() inside the traced decode step: the device query runs
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
