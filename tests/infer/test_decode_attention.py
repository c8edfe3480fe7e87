"""decode_attention: the Triton kernel equals SDPA with the prefix mask.

On CPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1 must be set before the
kernel is defined, hence a subprocess) at its default tile (kernel_config) and the other
column tiles tools/bench_attention.py --decode-sweep times; float32, tolerance 1e-5 (both accumulate in fp32,
in different orders). Columns past every visible length hold NaN: the kernel must never
read them into a result. On CUDA: bf16 against the float32 definition, and the compiled
CUDA-graph call against the eager one.
"""

import json
import textwrap

import pytest
import torch

from cat_titan.infer.decode_attention import decode_attention, reference_decode_attention

from .. import interpreter
from ..interpreter import INTERPRETABLE, WHY_NOT


# (B, Hq, Hkv, T, N, hd): GQA groups 1/2/4, one or two queries, blocks of 64 crossed or not
SHAPES = [(3, 4, 2, 2, 70, 16), (2, 6, 6, 1, 130, 32), (2, 8, 2, 1, 5, 64), (4, 4, 1, 2, 64, 64),
          (1, 2, 2, 1, 200, 128)]

CHECK = textwrap.dedent("""
    import json, sys, torch
    from cat_titan.infer.decode_attention import launch_decode_kernel, _decode_kernel, reference_decode_attention
    torch.manual_seed(0)
    errors = []
    for B, Hq, Hkv, T, N, hd in json.loads(sys.argv[1]):
        q = torch.randn(B, T, Hq, hd).transpose(1, 2)  # strided like the runners' queries
        k, v = torch.randn(B, Hkv, N, hd), torch.randn(B, Hkv, N, hd)
        lengths = torch.randint(1, N + 1, (B, T))
        lengths[0, 0], lengths[-1, -1] = 1, N
        want = reference_decode_attention(q, k, v, lengths)
        n_max = int(lengths.max())
        if n_max < N:  # nothing past the longest visible length may be read
            k[:, :, n_max:], v[:, :, n_max:] = float("nan"), float("nan")
        for cfg in (None, {"BLOCK_N": 32}, {"BLOCK_N": 128}):  # kernel_config's tile, and the others
            out = launch_decode_kernel(_decode_kernel, q, k, v, lengths, cfg)
            errors.append((out - want).abs().max().item())
    print(json.dumps(errors))
""")


@pytest.mark.skipif(not INTERPRETABLE, reason=WHY_NOT)
def test_kernel_in_interpreter_equals_masked_sdpa():
    errors = interpreter.run(CHECK, json.dumps(SHAPES), timeout=300)
    assert len(errors) == 3 * len(SHAPES)
    assert max(errors) <= 1e-5, errors  # NaN (a read past the visible columns) fails too


def test_cpu_path_is_the_definition():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    lengths = torch.tensor([[3], [9]])
    out = decode_attention(q, k, v, lengths)
    # independent computation: softmax over the visible columns only
    for b, n in enumerate([3, 9]):
        for h in range(4):
            s = (q[b, h] @ k[b, h // 2, :n].T) / 4.0
            assert torch.allclose(out[b, h], s.softmax(-1) @ v[b, h // 2, :n], atol=1e-6)
    assert torch.equal(out, reference_decode_attention(q, k, v, lengths))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_kernel_bf16_and_cuda_graph(shape):
    B, Hq, Hkv, T, N, hd = shape
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(B, T, Hq, hd, device="cuda", generator=g).transpose(1, 2)
    k, v = (torch.randn(B, Hkv, N, hd, device="cuda", generator=g) for _ in range(2))
    lengths = torch.randint(1, N + 1, (B, T), device="cuda", generator=g)
    want = reference_decode_attention(q, k, v, lengths)  # float32
    out32 = decode_attention(q, k, v, lengths)
    assert (out32 - want).abs().max().item() <= 1e-5
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = decode_attention(qb, kb, vb, lengths)
    assert (out.float() - want).abs().max().item() <= 3e-2  # bf16 inputs and probabilities
    step = torch.compile(decode_attention, mode="reduce-overhead", dynamic=False)
    for _ in range(3):  # warm-up, record, replay
        got = step(qb, kb, vb, lengths).clone()
    assert torch.equal(got, out)
