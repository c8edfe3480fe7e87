"""chunk_attention: the compressor's Triton attention kernels against float64 autograd.

On CPU the forward and backward kernels run in Triton's interpreter (TRITON_INTERPRET=1 must
be set before the kernels are defined, hence a subprocess), float32 inputs with IEEE dots:
output and gradients within 1e-5 of float64 SDPA and its autograd (both accumulate in at
least fp32, in different orders). Inputs are strided like the model's (q in (N, S, H, hd)
storage, k and v gapped views of one projection), with S from 1 to 64, GQA groups 1-3, head
dims 16-128, and the padded row tile at its default and one size larger. On CUDA: the
compiled op in bf16 against float32, and the compressor's attention through common.attend.
"""

import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from cat_titan.models import chunk_attention as ca
from cat_titan.models.common import attend, short_attention
from .. import interpreter
from ..interpreter import INTERPRETABLE, WHY_NOT

# (N, Hq, Hkv, S, hd)
SHAPES = [(2, 2, 2, 9, 64), (1, 3, 1, 5, 32), (2, 4, 2, 17, 16), (1, 2, 2, 1, 16), (1, 1, 1, 64, 32),
          (1, 2, 1, 34, 128)]

CHECK = textwrap.dedent("""
    import json, sys, torch
    import torch.nn.functional as F
    from cat_titan.models import chunk_attention as ca
    torch.manual_seed(0)
    errors = []
    for N, Hq, Hkv, S, hd in json.loads(sys.argv[1]):
        # as in the model: q and dO (N, S, Hq, hd) storage; k and v gapped views of one
        # (N, S, Hkv, 2, hd) projection
        q, do = (torch.randn(N, S, Hq, hd).transpose(1, 2) for _ in range(2))
        kv = torch.randn(N, S, Hkv, 2, hd)
        k, v = kv[:, :, :, 0].transpose(1, 2), kv[:, :, :, 1].transpose(1, 2)
        x = [t.double().requires_grad_() for t in (q, k, v)]
        want = F.scaled_dot_product_attention(*x, enable_gqa=Hq != Hkv)
        grads = torch.autograd.grad(want, x, do.double())
        block = ca.launch_config(S, hd)["BLOCK_S"]
        for cfg in (None, {"BLOCK_S": 2 * block}):
            out = ca.launch_fwd(ca._chunk_attn_fwd_kernel, q, k, v, cfg)
            got = ca.launch_bwd(ca._chunk_attn_bwd_kernel, q, k, v, do, cfg)
            # each gradient dense, in (N, S, H, hd) order like its input
            dense = [g.transpose(1, 2).is_contiguous() for g in got]
            errors.append([float((out.double() - want).abs().max())]
                          + [float((g.double() - w).abs().max()) for g, w in zip(got, grads)] + [all(dense)])
    print(json.dumps(errors))
""")


@pytest.mark.skipif(not INTERPRETABLE, reason=WHY_NOT)
def test_kernels_in_interpreter_equal_float64_autograd():
    rows = interpreter.run(CHECK, json.dumps(SHAPES), timeout=600)
    assert len(rows) == 2 * len(SHAPES)
    for shape, row in zip([s for s in SHAPES for _ in range(2)], rows):
        *errs, dense = row
        assert dense, f"{shape}: gradients are not dense in (N, S, H, hd) order"
        assert max(errs) < 1e-5, f"{shape}: max abs error of out, dq, dk, dv {errs}"


def test_cpu_uses_the_matmul_form_and_the_kernel_refuses_cpu():
    q, k, v = (torch.randn(4, 2, 9, 16) for _ in range(3))
    assert not ca.kernel_supports(q, k)
    torch.testing.assert_close(attend(q, k, v, "full"), short_attention(q, k, v), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"no kernel for q \(4, 2, 9, 16\).*on cpu.*needs CUDA"):
        ca.chunk_attention(q, k, v)


def test_launch_config_pads_rows_to_a_power_of_two_tile_with_warps_by_size():
    assert [ca.launch_config(S, 64)["BLOCK_S"] for S in (1, 9, 16, 17, 34, 64)] == [16, 16, 16, 32, 64, 64]
    # the measured best (H100): 1 warp for 16 x 64 tiles, 4 for 64 x 64
    assert [ca.launch_config(S, 64)["num_warps"] for S in (9, 17, 34)] == [1, 2, 4]
    assert [ca.launch_config(9, hd)["num_warps"] for hd in (16, 128)] == [1, 2]


cuda = pytest.mark.skipif(not torch.cuda.is_available() or ca.triton is None,
                          reason="needs a CUDA GPU and triton (the kernel runs on CUDA only)")


def _inputs(N, Hq, Hkv, S, hd, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(N, S, H, hd, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
            for H in (Hq, Hkv, Hkv, Hq)]


@cuda
@pytest.mark.parametrize("shape", [(2048, 12, 12, 9, 64), (64, 4, 2, 34, 64), (16, 2, 1, 3, 128)])
def test_cuda_op_bf16_compiled_equals_float32(shape):
    q, k, v, do = _inputs(*shape, torch.bfloat16)
    x32 = [t.float().requires_grad_() for t in (q, k, v)]
    want = F.scaled_dot_product_attention(*x32, enable_gqa=shape[1] != shape[2])
    want_grads = torch.autograd.grad(want, x32, do.float())
    f = torch.compile(ca.chunk_attention, fullgraph=True, dynamic=False)
    for fn in (ca.chunk_attention, f):
        x = [t.detach().requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        grads = torch.autograd.grad(out, x, do)
        # bf16 inputs, fp32 accumulation; P and dS rounded to bf16 before their matmuls
        torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g.float(), w, atol=3e-2, rtol=3e-2)


@cuda
def test_cuda_attend_full_uses_the_kernel_float32_exact():
    q, k, v, _ = _inputs(128, 4, 4, 9, 64, torch.float32)
    out = attend(q, k, v, "full")
    torch.testing.assert_close(out, ca.chunk_attention(q, k, v), rtol=0, atol=0)
    # IEEE fp32 dots: the same function as the matmul form to fp32 rounding
    torch.testing.assert_close(out, short_attention(q.double(), k.double(), v.double()).float(),
                               atol=1e-5, rtol=1e-5)


@cuda
def test_cuda_compiled_compressor_block_runs_the_kernels_and_equals_eager():
    """What training compiles: a compressor block (bf16 autocast) calls both kernels in its
    forward and backward graphs, and equals the same block in eager mode."""
    from torch._inductor.utils import run_and_get_code

    from cat_titan.models.common import TransformerBlock, rope_table

    torch.manual_seed(0)
    block = TransformerBlock(256, 4, 4, 512).cuda()
    x = torch.randn(64, 9, 256, device="cuda", requires_grad=True)
    rope = rope_table(64, 9, 10000.0, device="cuda")

    def step(fn):
        x.grad = None
        with torch.autocast("cuda", torch.bfloat16):
            out = fn(x, rope, "full")
        out.float().square().mean().backward()
        return out.float(), x.grad.clone()

    want = step(block)
    got, code = run_and_get_code(step, torch.compile(block, dynamic=False))
    code = "\n".join(code)
    assert "_chunk_attn_fwd_kernel" in code and "_chunk_attn_bwd_kernel" in code
    for g, w in zip(got, want):  # same kernels; inductor fuses the ops around them differently
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)


def test_bench_attention_refuses_bad_compressor_chunks_before_any_work():
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[2] / "tools" / "bench_attention.py"
    for bad in ("8", "8:0", "a:1"):
        r = subprocess.run([sys.executable, str(tool), "--compressor", "--compressor-chunks", bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and f"--compressor-chunks: '{bad}': want positive chunk:prefix pairs" in r.stderr
