"""cat_titan/infer/lt_gemm.py: cuBLASLt GEMMs with a timed algorithm choice.

CPU: both ops are exactly ``F.linear`` / ``addmm_`` (their fallbacks); compiled by inductor the
in-place op updates its buffer without a copy; a lean runner with tuned GEMMs generates the
plain runner's tokens and logits bit for bit (the same ops run). CUDA: every candidate the
tuner keeps agrees with torch's GEMM (bf16: within 1% of the output's largest value, the
filter it applies; fp32: 1e-5 relative), calls during a CUDA-graph capture work, and the
tuned runner's generation equals eager (test_generate_cuda.py).
"""

import pytest
import torch

from cat_titan.infer import make_runner, stream
from cat_titan.infer.lt_gemm import Shape, lt_linear, lt_residual_linear_, plans, tune

from .util import debug_model


def test_cpu_ops_are_linear_and_addmm():
    g = torch.Generator().manual_seed(0)
    x, w, y = torch.randn(5, 12, generator=g), torch.randn(7, 12, generator=g), torch.randn(5, 7, generator=g)
    assert torch.equal(lt_linear(x, w), torch.nn.functional.linear(x, w))
    want = y.clone().addmm_(x, w.t())
    lt_residual_linear_(y, x, w)
    assert torch.equal(y, want)


def test_compiled_residual_op_updates_its_buffer_in_place():
    from torch._inductor.utils import run_and_get_code

    def f(h, a, w):
        lt_residual_linear_(h, a, w)
        return lt_linear(h, w.t().contiguous())

    g = torch.Generator().manual_seed(1)
    h, a, w = torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    want_h = h.clone().addmm_(a, w.t())
    want = want_h @ w
    out, codes = run_and_get_code(torch.compile(f), h, a, w)
    assert torch.equal(h, want_h) and torch.allclose(out, want, atol=1e-6)
    code = "\n".join(codes)
    assert "cat_titan.lt_residual_linear_.default(" in code and "auto_functionalized" not in code


def test_tuned_lean_runner_on_cpu_is_the_lean_runner():
    model = debug_model("debug-cat")
    prompts = [[5, 9, 2, 7], [4, 4, 8, 1, 0, 6]]
    tuned_before = plans()
    runs = []
    for tuned in (False, True):
        runner = make_runner(model, 2, 6 + 10, model.args.chunk_size)
        runner.lean_linears(tuned_gemms=tuned)
        runs.append(list(stream(model, prompts, 10, runner=runner)))
    for a, b in zip(*runs):
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)
    assert plans() == tuned_before  # nothing is tuned off CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.usefixtures("exact_matmuls")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("accumulate", [False, True])
def test_cuda_tuned_gemm_agrees_with_torch_also_in_a_graph(dtype, accumulate):
    M, N, K = 64, 1536, 4096
    plan = tune(Shape(M, N, K, accumulate, dtype, torch.cuda.current_device()), min_gain=-1.0)  # keep the best
    assert plan is not None and plan.algo is not None
    g = torch.Generator(device="cuda").manual_seed(2)
    x = torch.randn(M, K, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(N, K, device="cuda", dtype=dtype, generator=g) * K ** -0.5
    y = torch.randn(M, N, device="cuda", dtype=dtype, generator=g)
    want = y.float() * accumulate + x.float() @ w.float().t()
    tol = (1e-2 if dtype == torch.bfloat16 else 1e-5) * want.abs().max().item()
    out = y.clone()
    plan.run(x, w, out)
    assert (out.float() - want).abs().max().item() <= tol
    graph, out = torch.cuda.CUDAGraph(), y.clone()
    with torch.cuda.graph(graph):
        plan.run(x, w, out)
    out.copy_(y)
    graph.replay()
    torch.cuda.synchronize()
    assert (out.float() - want).abs().max().item() <= tol


@pytest.mark.parametrize("name,adaptive", [("debug-cat-adaptive", True), ("debug-hybrid", False)])
def test_runner_prepares_every_shape_its_lean_steps_run(monkeypatch, name, adaptive):
    """compile_step on CUDA tunes, before any step, each (rows, weight, accumulate) its lean
    steps call: B rows (and 2B where adaptive completions add a query per row), the folded
    weights when norms are folded, the head. The tuner itself needs CUDA (the test above), so
    here its entry point records the calls."""
    import cat_titan.infer.runners as runners

    model = debug_model(name)
    runner = make_runner(model, 3, 32, 4 if adaptive else model.args.chunk_size)
    lean = runner.lean_linears(fold_norms=True, tuned_gemms=True)
    calls = []
    monkeypatch.setattr(runners, "lt_prepare", lambda m, w, acc: calls.append((m, w, acc)))
    runner._prepare_tuned_gemms()
    rows = (3, 6) if adaptive else (3,)
    want = []
    for i, layer in enumerate(model.layers):
        if lean[i]:
            for m in rows:
                want += [(m, runner._folded_qkv[i], False), (m, layer.attention.wo.weight, True),
                         (m, runner._folded_gate_up[i], False), (m, layer.feed_forward.w2.weight, True)]
    want.append((3, model.head.output.weight, False))
    assert any(lean) and len(calls) == len(want)
    assert all(a[0] == b[0] and a[1] is b[1] and a[2] == b[2] for a, b in zip(calls, want))
    runner.fuse_linears()  # another path: nothing of the lean runner's left to tune
    assert not runner.tuned_gemms
