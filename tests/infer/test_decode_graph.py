"""The compiled decode step (CPU inductor) gives the eager tokens and writes its caches in
place: no temporary as large as a cache tensor in the generated code (the functional
``scatter`` of an earlier version copied every cache twice per layer and step)."""

import torch

from cat_titan.infer import make_runner, stream
from cat_titan.infer.profiling import decode_graph_code, summarize_graph_code

from .util import debug_model


def _cache_bytes(runner) -> int:
    return min(c.k.numel() * c.k.element_size() for c in runner.caches())


def test_compiled_adaptive_step_is_exact_and_in_place():
    """Adaptive CAT at chunk 4 (a resized compressor projection), aligned rows: both step
    variants compile (no chunk completes / every row completes, compressor inside)."""
    model = debug_model("debug-cat-adaptive")
    prompts = torch.tensor([[5, 9, 2, 7, 1, 3], [4, 4, 8, 1, 0, 6]])
    n = 7  # positions 6..12: chunks complete at positions 7 and 11
    runner = make_runner(model, 2, 200, 4)  # long caches: far larger than any activation
    runner.compile_step()
    tokens, codes = decode_graph_code(model, runner, prompts, n, chunk_size=4)
    eager = list(stream(model, prompts, n, chunk_size=4))
    assert tokens == torch.stack([s.tokens for s in eager], 1).tolist()
    summary = summarize_graph_code(codes, _cache_bytes(runner))
    assert summary["graphs"] == 2, summary
    for g in summary["per_graph"]:
        assert g["cache_sized_temporaries"] == [], g
        assert g["kernel_calls"] > 0


def test_graph_summary_flags_a_copied_cache():
    """The checker itself: a step that scatters out of place into a cache-sized buffer is flagged."""
    model = debug_model("debug-dense")
    runner = make_runner(model, 2, 64, 0)

    def copying_step(k_cache, col, val):  # what functionalised scatter_ compiled to
        return k_cache.scatter(2, col, val) * 1.0

    k = runner.caches()[0].k
    col = torch.zeros(k.shape[0], k.shape[1], 1, k.shape[3], dtype=torch.long)
    from torch._inductor.utils import run_and_get_code

    _, codes = run_and_get_code(torch.compile(copying_step), k, col, torch.ones_like(col, dtype=k.dtype))
    summary = summarize_graph_code(codes, _cache_bytes(runner))
    assert len(summary["per_graph"][0]["cache_sized_temporaries"]) >= 1, summary


def test_attend_buckets_change_nothing_but_the_attended_length():
    """Dense layers attending over the filled prefix (rounded up to a bucket) give the tokens
    and logits of attending over the whole cache, for mixed prompt lengths."""
    for name in ("debug-dense", "debug-hybrid"):
        model = debug_model(name)
        prompts = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8]]
        C = model.args.chunk_size if name == "debug-hybrid" else 0
        full = list(stream(model, prompts, 30, runner=make_runner(model, 3, 41, C)))
        runner = make_runner(model, 3, 41, C, attend_bucket=8)
        lens = []
        step = runner.step
        runner.step = lambda tok, pos, pos_host: (lens.append(runner.attend_len(pos_host)), step(tok, pos, pos_host))[1]
        bucketed = list(stream(model, prompts, 30, runner=runner))
        assert [s.tokens.tolist() for s in bucketed] == [s.tokens.tolist() for s in full]
        assert max((a.logits - b.logits).abs().max().item() for a, b in zip(bucketed, full)) <= 1e-5
        # first step feeds position 11 (12 columns -> 16), the last position 39 (40 columns)
        assert lens[0] == 16 and lens[-1] == 40 < runner.dense_len and sorted(lens) == lens
