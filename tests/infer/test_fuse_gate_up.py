"""Fused w1|w3 feed-forward weights for the decode step (runners.fuse_gate_up): the model
computes what it did, its state dict is unchanged, cached generation through the fused path
equals greedy decoding by full forward passes, and weights replaced after fusing are used.
CPU, float32; tolerance 1e-6 on feed-forward outputs of order 1 (one GEMM over the same K
instead of two), 1e-4 on logits as in test_generate.py."""

import pytest
import torch
import torch.nn.functional as F

from cat_titan.infer import generate, make_runner
from cat_titan.infer.runners import fuse_gate_up

from .util import greedy_by_full_forward, perturbed

PROMPTS = [[5, 9, 3, 7, 1], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22], [7, 7, 7]]


def test_fused_weight_is_the_two_halves_and_changes_nothing():
    model = perturbed("debug-cat")
    ff = model.layers[0].feed_forward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 5, ff.w1.in_features)
    want = ff(x)
    fused = fuse_gate_up(ff)
    hidden = ff.w1.out_features
    assert fused.shape == (2 * hidden, ff.w1.in_features)
    assert fuse_gate_up(ff) is fused  # idempotent
    assert ff.w1.weight.data_ptr() == fused.data_ptr()  # views: no second copy of the weights
    assert ff.w3.weight.data_ptr() == fused[hidden:].data_ptr()
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    torch.testing.assert_close(ff(x), want, rtol=0, atol=1e-6)
    a, b = F.linear(x, fused).chunk(2, dim=-1)
    torch.testing.assert_close(ff.w2(F.silu(a) * b), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name,chunk", [("debug-dense", None), ("debug-cat", None), ("debug-cat-adaptive", 4),
                                        ("debug-hybrid", None)])
def test_generation_through_fused_weights_equals_full_forward(name, chunk):
    model = perturbed(name)
    kw = {"chunk_size": chunk} if chunk else {}
    runner = make_runner(model, len(PROMPTS), 11 + 12, chunk or model.args.chunk_size)
    runner.fuse_weights()
    assert all(g is not None for g in runner._gate_up)
    out = generate(model, PROMPTS, 12, runner=runner, **kw)
    for prompt, toks in zip(PROMPTS, out):
        assert toks == greedy_by_full_forward(model, prompt, 12, chunk)[0]


def test_weights_replaced_after_fusing_are_used():
    model = perturbed("debug-cat")
    runner = make_runner(model, len(PROMPTS), 23, model.args.chunk_size)
    runner.fuse_weights()
    old = runner._gate_up[0]
    generate(model, PROMPTS, 4, runner=runner)
    ff = model.layers[0].feed_forward
    g = torch.Generator().manual_seed(3)
    ff.w1.weight.data = torch.randn(ff.w1.weight.shape, generator=g) * 0.5  # a new storage
    out = generate(model, PROMPTS, 12, runner=runner)  # re-fuses before the prefill
    assert runner._gate_up[0] is not old
    for prompt, toks in zip(PROMPTS, out):
        assert toks == greedy_by_full_forward(model, prompt, 12)[0]


@pytest.mark.slow
def test_compiled_step_reads_refreshed_weights():
    """Under torch.compile the fused tensors are read from the runner at each call (guarded),
    not baked into the graph: after a weight is replaced the compiled step uses the new one."""
    model = perturbed("debug-cat")
    runner = make_runner(model, len(PROMPTS), 23, model.args.chunk_size)
    runner.fuse_weights()
    runner.compile_step()
    before = generate(model, PROMPTS, 12, runner=runner)
    for prompt, toks in zip(PROMPTS, before):
        assert toks == greedy_by_full_forward(model, prompt, 12)[0]
    ff = model.layers[1].feed_forward
    ff.w3.weight.data = torch.randn(ff.w3.weight.shape, generator=torch.Generator().manual_seed(4)) * 0.5
    after = generate(model, PROMPTS, 12, runner=runner)
    assert after != before  # the new weight changes the tokens, so stale weights would show
    for prompt, toks in zip(PROMPTS, after):
        assert toks == greedy_by_full_forward(model, prompt, 12)[0]
