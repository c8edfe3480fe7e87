"""Cached generation is exact: the same tokens (and logits to 1e-4) as greedy decoding by
full forward passes, for every model kind, batched prompts of any lengths, and caches of
num_chunks + chunk_size columns. CPU, float32."""

import math

import pytest
import torch

from cat_titan.infer import SamplingParams, generate, make_runner, sample, stream
from cat_titan.models.base import ModelInputError

from .util import debug_model, greedy_by_full_forward

# (preset, chunk size at generation): adaptive CATs at every chunk size they accept
CASES = [("debug-dense", None), ("debug-cat", None), ("debug-cat-adaptive", 1), ("debug-cat-adaptive", 2),
         ("debug-cat-adaptive", 4), ("debug-cat-adaptive", 8), ("debug-cat-layer", None), ("debug-hybrid", None)]
IDS = [f"{n}-{c}" if c else n for n, c in CASES]

# Lengths: not multiples of the chunk size (8), one exact multiple (16: the prompt's last
# token is predicted from a slot), several chunks; with 22 new tokens every row crosses
# 2-5 chunk boundaries, at a different phase than the others.
PROMPT_LENS = (5, 11, 16, 3, 21)
N_NEW = 22
TOL = 1e-4  # float32 logits, of order 1-4


def _prompts(lens=PROMPT_LENS, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("name,chunk", CASES, ids=IDS)
def test_cached_greedy_equals_full_forward(name, chunk):
    model = debug_model(name)
    prompts = _prompts()
    steps = list(stream(model, prompts, N_NEW, chunk_size=chunk))
    assert len(steps) == N_NEW
    tokens = torch.stack([s.tokens for s in steps], 1)  # (B, N)
    logits = torch.stack([s.logits for s in steps], 1)  # (B, N, V)
    for b, p in enumerate(prompts):
        want_tokens, want_logits = greedy_by_full_forward(model, p, N_NEW, chunk)
        err = (logits[b] - want_logits).abs().max().item()
        assert err <= TOL, f"row {b} (prompt length {len(p)}): logits differ by {err}"
        assert tokens[b].tolist() == want_tokens, f"row {b} (prompt length {len(p)})"


@pytest.mark.parametrize("name,chunk", CASES, ids=IDS)
def test_batched_equals_each_alone(name, chunk):
    model = debug_model(name)
    prompts = _prompts(seed=6)
    batched = generate(model, prompts, N_NEW, chunk_size=chunk)
    alone = [generate(model, [p], N_NEW, chunk_size=chunk)[0] for p in prompts]
    assert batched == alone


@pytest.mark.parametrize("name,chunk", [("debug-cat", None), ("debug-cat-adaptive", 4), ("debug-hybrid", None),
                                        ("debug-dense", None)])
def test_aligned_tensor_prompts(name, chunk):
    """Equal lengths: every row completes its chunks at the same step (the compressor runs
    on the whole batch at once, no row gather)."""
    model = debug_model(name)
    prompts = torch.tensor(_prompts((6, 6, 6), seed=7))
    out = generate(model, prompts, 19, chunk_size=chunk)
    for b in range(3):
        assert out[b] == greedy_by_full_forward(model, prompts[b].tolist(), 19, chunk)[0]


def test_long_generation_keeps_cat_caches_small():
    """248 tokens at chunk 8: the CAT's caches hold 31+1 slots + 8 tokens, not 248 positions,
    and the tokens still match full forward passes all the way."""
    model = debug_model("debug-cat")
    prompt, n = list(range(1, 9)), 240
    L = len(prompt) + n
    gen = stream(model, [prompt], n)
    steps = list(gen)
    expected_cols = L // 8 + 1 + 8
    caches = gen.runner.caches()
    assert len(caches) == model.args.n_layers
    for c in caches:
        assert tuple(c.k.shape) == (1, model.args.kv_heads, expected_cols, model.args.dim // model.args.n_heads)
    assert expected_cols * 6 < L
    want, want_logits = greedy_by_full_forward(model, prompt, n)
    assert [int(s.tokens[0]) for s in steps] == want
    assert (torch.stack([s.logits[0] for s in steps]) - want_logits).abs().max() <= TOL


@pytest.mark.parametrize("name,chunk,per_layer", [
    ("debug-cat-adaptive", 8, lambda L, C: L // C + 1 + 1 + C + 1),  # fx per chunk, one sep, scratch
    ("debug-cat-adaptive", 4, lambda L, C: L // C + 1 + 1 + C + 1),
    ("debug-cat-layer", None, lambda L, C: L // C + 1 + C),
    ("debug-hybrid", None, lambda L, C: L // C + 1 + C),  # CAT layers; its dense layer keeps ~L
    ("debug-dense", None, lambda L, C: L),
])
def test_cache_sizes(name, chunk, per_layer):
    model = debug_model(name)
    C = chunk or model.args.chunk_size
    gen = stream(model, [[1, 2, 3], [4] * 10], 200, chunk_size=chunk)
    for _ in gen:
        pass
    L = 210
    kinds = model.args.layer_kinds() if model.args.kind != "cat_adaptive" else ["cat"] * model.args.n_layers
    cols = [c.columns for c in gen.runner.caches()]
    # dense layers of a hybrid: rounded up to whole chunks (the prefill runs on whole chunks)
    dense_len = math.ceil(L / C) * C if "cat" in kinds else L
    want = [dense_len if k == "dense" else per_layer(L, C) for k in kinds]
    assert cols == want
    cat_cols = [c for c, k in zip(cols, kinds) if k == "cat"]
    assert all(c < L for c in cat_cols)


def test_eos_stops_each_row_and_the_loop():
    model = debug_model("debug-cat-adaptive")
    prompts = _prompts((5, 12, 9), seed=8)
    ref = generate(model, prompts, N_NEW, chunk_size=2)
    eos = ref[0][3]
    cut = [r[: r.index(eos) + 1] if eos in r else r for r in ref]
    seen = []
    out = generate(model, prompts, N_NEW, chunk_size=2, eos_id=eos, callback=seen.append)
    assert out == cut
    assert len(out[0]) <= 4 and out[0][-1] == eos
    assert len(seen) == max(map(len, cut))  # the loop ends once every row has stopped
    # a row's eos is alive; after it the row is not
    assert all(bool(s.alive[0]) == (i < len(cut[0])) for i, s in enumerate(seen))
    alone = generate(model, prompts[:1], N_NEW, chunk_size=2, eos_id=eos)
    assert alone == cut[:1]


def test_sampling_reproducible_and_degenerate_filters_are_greedy():
    model = debug_model("debug-cat-layer")
    prompts = _prompts((4, 13), seed=9)
    kw = dict(temperature=0.9, top_k=50, top_p=0.95)
    a = generate(model, prompts, N_NEW, generator=torch.Generator().manual_seed(7), **kw)
    b = generate(model, prompts, N_NEW, generator=torch.Generator().manual_seed(7), **kw)
    c = generate(model, prompts, N_NEW, generator=torch.Generator().manual_seed(8), **kw)
    assert a == b and a != c
    assert all(0 <= t < model.args.vocab_size for row in a + c for t in row)
    greedy = generate(model, prompts, N_NEW)
    g = torch.Generator().manual_seed(0)
    assert generate(model, prompts, N_NEW, temperature=1.3, top_k=1, generator=g) == greedy
    assert generate(model, prompts, N_NEW, temperature=1.3, top_p=1e-6, generator=g) == greedy
    hot = generate(model, prompts, N_NEW, temperature=5.0, generator=g)
    assert hot != greedy


def test_tiny_temperatures_are_greedy():
    # logits / T overflows float32 for T below ~1e-38 (and T itself rounds to 0 below ~1e-45):
    # every valid temperature must still give finite probabilities, here all on the argmax.
    model = debug_model("debug-cat-layer")
    prompts = _prompts((4, 13), seed=9)
    greedy = generate(model, prompts, N_NEW)
    g = torch.Generator().manual_seed(0)
    for kw in (dict(), dict(top_k=5), dict(top_p=0.9)):
        for t in (1e-30, 1e-40, 1e-50, 5e-324):
            assert generate(model, prompts, N_NEW, temperature=t, generator=g, **kw) == greedy, (t, kw)


def test_top_k_keeps_exactly_k_tokens_on_ties():
    n = 20000
    g = torch.Generator().manual_seed(0)
    # ten tokens tied at the k-th largest logit (as bf16 logits often are): exactly k survive
    tied = torch.tensor([3.0] + [1.0] * 10 + [0.0]).expand(n, 12).contiguous()
    for k in (1, 2, 4):
        t = sample(tied, SamplingParams(temperature=1.0, top_k=k), 12, g)
        assert t.unique().numel() == k, (k, torch.bincount(t, minlength=12).tolist())
    # top_k=1 with two tokens tied at the top: one token, always (greedy), not a coin flip
    top_tie = torch.tensor([2.0, 2.0, 1.0, 0.0]).expand(n, 4).contiguous()
    t = sample(top_tie, SamplingParams(temperature=1.0, top_k=1), 4, g)
    assert t.unique().numel() == 1 and int(t[0]) in (0, 1)
    # bf16-rounded logits of a large vocabulary: every row draws only from its own top k
    logits = (torch.randn(64, 32000, generator=g) * 3).bfloat16().float()
    top = logits.topk(50, dim=-1).indices  # (64, 50)
    for _ in range(20):
        t = sample(logits, SamplingParams(temperature=5.0, top_k=50), 32000, g)
        assert (top == t[:, None]).any(-1).all()


def test_sampler_distribution_and_filters():
    n = 40000
    probs = torch.tensor([0.5, 0.3, 0.2])
    logits = torch.full((n, 8), 50.0)  # columns >= vocab_size (3): padding, never chosen
    logits[:, :3] = probs.log()
    g = torch.Generator().manual_seed(0)

    def freqs(**kw):
        t = sample(logits, SamplingParams(temperature=1.0, **kw), 3, g)
        return torch.bincount(t, minlength=3).float() / n

    assert torch.allclose(freqs(), probs, atol=0.015)
    assert torch.allclose(freqs(top_k=2), torch.tensor([0.625, 0.375, 0.0]), atol=0.015)
    assert torch.allclose(freqs(top_p=0.6), torch.tensor([0.625, 0.375, 0.0]), atol=0.015)
    assert torch.allclose(freqs(top_p=0.5), torch.tensor([1.0, 0.0, 0.0]))
    t2 = sample(logits, SamplingParams(temperature=0.5), 3, g)  # sharper: p ~ probs**2
    sharp = torch.bincount(t2, minlength=3).float() / n
    assert torch.allclose(sharp, probs**2 / (probs**2).sum(), atol=0.015)
    assert sample(logits, SamplingParams(), 3).eq(0).all()
    assert sample(logits, SamplingParams(), 8).eq(3).all()  # padding only when asked


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_greedy_in_the_logits_dtype_is_the_float_argmax(dtype):
    """Greedy takes the argmax in the logits' own dtype (no float copy): the same ids as the
    float32 argmax, the first of tied maxima (bf16 ties often), padding columns excluded."""
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(64, 1000, generator=g) * 3).to(dtype)  # (B, V_padded), many ties in bf16
    logits[:, 990:] = 100.0  # padding columns (vocab 990) that would win
    logits[0, [7, 500]] = 50.0  # an exact tie at the top: the first index
    got = sample(logits, SamplingParams(), 990)
    assert got.dtype == torch.long
    assert torch.equal(got, logits[:, :990].float().argmax(-1))
    assert int(got[0]) == 7 and int(got.max()) < 990


def test_runner_reuse_across_calls():
    for name, chunk in [("debug-hybrid", None), ("debug-cat-adaptive", 2), ("debug-dense", None)]:
        model = debug_model(name)
        C = chunk or (model.args.chunk_size if name != "debug-dense" else 0)
        runner = make_runner(model, 3, 40, C)
        first, second = _prompts((7, 2, 12), seed=10), _prompts((3, 9, 1), seed=11)
        generate(model, first, 20, chunk_size=chunk, runner=runner)
        assert generate(model, second, 20, chunk_size=chunk, runner=runner) == \
            generate(model, second, 20, chunk_size=chunk)
        with pytest.raises(ValueError, match="make_runner"):
            generate(model, second, 32, chunk_size=chunk, runner=runner)  # 9 + 32 > max_len 40
        with pytest.raises(ValueError, match="make_runner"):
            generate(model, second[:2], 20, chunk_size=chunk, runner=runner)  # batch 2 != 3


def test_bad_requests_are_named():
    cat, ada = debug_model("debug-cat"), debug_model("debug-cat-adaptive")
    bs = cat.args.block_size
    with pytest.raises(ValueError, match=f"block_size {bs}.*at most {bs - 10}"):
        generate(cat, [[1] * 10], bs - 9)
    assert len(generate(cat, [[1] * 10], bs - 10)[0]) == bs - 10
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(cat, [[1], []], 3)
    with pytest.raises(ModelInputError, match="valid chunk sizes"):
        generate(ada, [[1, 2]], 3, chunk_size=3)
    with pytest.raises(ModelInputError, match="chunk_size=4"):
        generate(cat, [[1, 2]], 3, chunk_size=4)
    with pytest.raises(ModelInputError, match="token ids"):
        generate(cat, [[1, 100000]], 3)
    for kw, msg in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                    (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=msg):
            generate(cat, [[1, 2]], 3, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(cat, [[1, 2]], -1)
    assert generate(cat, [[1, 2], [3]], 0) == [[], []]
    assert generate(cat, [5, 6, 7], 4) == generate(cat, [[5, 6, 7]], 4)  # one flat prompt
    with pytest.raises(ValueError, match="captures CUDA graphs, but the model is on cpu"):
        make_runner(cat, 1, 8, cat.args.chunk_size).compile_step(mode="graphs")
    from cat_titan.infer.bench import SpeedConfig

    with pytest.raises(ValueError, match="graph_mode='tree'"):
        SpeedConfig(compile=True, cuda_graphs=True, graph_mode="tree").validate()


def test_static_step_shapes():
    """The decode step only scatters into preallocated caches: no buffer is replaced or
    resized across a generation (what torch.compile / CUDA graphs rely on)."""
    for name, chunk in [("debug-cat-adaptive", 4), ("debug-hybrid", None)]:
        model = debug_model(name)
        gen = stream(model, _prompts((3, 10), seed=12), 30, chunk_size=chunk)
        before = {n: (b.data_ptr(), tuple(b.shape)) for n, b in gen.runner.named_buffers()}
        for _ in gen:
            pass
        after = {n: (b.data_ptr(), tuple(b.shape)) for n, b in gen.runner.named_buffers()}
        assert before == after and len(before) >= 2 * model.args.n_layers
        assert math.isfinite(float(sum(b.float().abs().sum() for b in gen.runner.buffers())))
