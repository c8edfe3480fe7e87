"""On CUDA: cached generation (FlexAttention prefill, SDPA decode steps) equals greedy full
forward passes, and the compiled / CUDA-graph decode steps equal the eager ones. float32."""

import pytest
import torch

from cat_titan.infer import generate, make_runner, stream

from .util import greedy_by_full_forward, perturbed

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
              pytest.mark.usefixtures("exact_matmuls")]

CASES = [("debug-dense", None), ("debug-cat", None), ("debug-cat-adaptive", 1), ("debug-cat-adaptive", 4),
         ("debug-cat-layer", None), ("debug-hybrid", None)]
PROMPT_LENS = (5, 11, 16, 3)


_MODELS = {}


def _cuda(name, backend="flex"):
    """The CPU tests' model on CUDA: FlexAttention for CAT masks (generation), or an SDPA
    twin with the same weights for the full-forward oracle (flex would compile a graph
    for every prefix length)."""
    if (name, backend) not in _MODELS:
        model = perturbed(name, runtime_device="cuda" if backend == "flex" else "cpu")
        _MODELS[name, backend] = model.to("cuda")
    return _MODELS[name, backend]


def _prompts(lens=PROMPT_LENS, seed=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 257, (n,), generator=g).tolist() for n in lens]


@pytest.mark.parametrize("name,chunk", CASES)
def test_cuda_cached_equals_full_forward(name, chunk):
    model = _cuda(name)
    prompts = _prompts()
    steps = list(stream(model, prompts, 20, chunk_size=chunk))
    tokens = torch.stack([s.tokens for s in steps], 1).cpu()
    logits = torch.stack([s.logits for s in steps], 1)
    for b, p in enumerate(prompts):
        want, want_logits = greedy_by_full_forward(_cuda(name, "sdpa"), p, 20, chunk)
        assert (logits[b] - want_logits).abs().max().item() <= 1e-4
        assert tokens[b].tolist() == want


@pytest.mark.parametrize("name,chunk,mode,lean", [("debug-cat-adaptive", 2, None, None),
                                                  ("debug-hybrid", None, None, None),
                                                  ("debug-cat", None, "reduce-overhead", None),
                                                  ("debug-cat-adaptive", 4, "reduce-overhead", None),
                                                  ("debug-cat", None, "graphs", None),
                                                  ("debug-cat-adaptive", 4, "graphs", None),
                                                  ("debug-hybrid", None, "graphs", None),
                                                  ("debug-dense", None, "graphs", None),
                                                  ("debug-cat", None, "graphs", False),
                                                  ("debug-cat-adaptive", 4, "reduce-overhead", False),
                                                  ("debug-hybrid", None, "graphs", False),
                                                  ("debug-cat", None, "reduce-overhead", True),
                                                  ("debug-cat-adaptive", 4, "reduce-overhead", True),
                                                  ("debug-cat-adaptive", 4, "graphs", True),
                                                  ("debug-hybrid", None, "reduce-overhead", True),
                                                  ("debug-dense", None, "graphs", True)])
def test_cuda_compiled_step_equals_eager(name, chunk, mode, lean):
    """The compiled step on CUDA, its blocks as the default (lean=None: the lean path if
    runners.LEAN_BY_DEFAULT), the lean path (True; the model's CAT layers keep their ops) or
    the model's ops (False). Tokens equal eager, logits to 1e-4."""
    from cat_titan.infer.runners import LEAN_BY_DEFAULT

    model = _cuda(name)
    prompts = _prompts((6, 9, 13), seed=9)
    want = generate(model, prompts, 24, chunk_size=chunk)
    C = chunk or model.args.chunk_size
    runner = make_runner(model, len(prompts), 13 + 24, C)
    runner.compile_step(mode=mode, lean=lean)
    assert ("lean" in runner.decode_paths) == (lean or (lean is None and LEAN_BY_DEFAULT)), runner.decode_paths
    steps = list(stream(model, prompts, 24, chunk_size=chunk, runner=runner))
    assert torch.stack([s.tokens for s in steps], 1).tolist() == want
    # logits kept across steps stay valid (CUDA graphs reuse their output buffers)
    eager = list(stream(model, prompts, 24, chunk_size=chunk))
    assert max((a.logits - b.logits).abs().max().item() for a, b in zip(steps, eager)) <= 1e-4
    again = _prompts((2, 12, 7), seed=10)  # reuse: same graphs, new caches contents
    assert generate(model, again, 24, chunk_size=chunk, runner=runner) == generate(model, again, 24, chunk_size=chunk)


@pytest.mark.parametrize("name", ["debug-dense", "debug-hybrid"])
def test_cuda_attend_buckets_compiled_equal_eager(name):
    """Dense layers attending over bucketed cache prefixes (one CUDA graph per bucket) give
    the eager tokens of the whole-cache step."""
    model = _cuda(name)
    prompts = _prompts((6, 9, 13), seed=11)
    want = generate(model, prompts, 24)
    C = model.args.chunk_size if name == "debug-hybrid" else 0
    runner = make_runner(model, len(prompts), 13 + 24, C, attend_bucket=8)
    runner.compile_step(mode="reduce-overhead")
    assert generate(model, prompts, 24, runner=runner) == want
    assert generate(model, prompts, 24, runner=runner) == want  # replayed graphs


@pytest.mark.parametrize("mode", ["reduce-overhead", "graphs"])
@pytest.mark.parametrize("name,chunk", [("debug-cat", None), ("debug-cat-adaptive", 4)])
def test_cuda_aligned_rows_compress_inside_the_cuda_graph(name, chunk, mode):
    """Equal prompt lengths: every row completes its chunk at once and the compressor runs
    inside the decode step's CUDA graph (the benchmark's case); tokens equal eager."""
    model = _cuda(name)
    prompts = torch.tensor(_prompts((7, 7, 7), seed=12))
    want = generate(model, prompts, 26, chunk_size=chunk)
    runner = make_runner(model, 3, 7 + 26, chunk or model.args.chunk_size)
    runner.compile_step(mode=mode)
    assert generate(model, prompts, 26, chunk_size=chunk, runner=runner) == want
    assert generate(model, prompts, 26, chunk_size=chunk, runner=runner) == want


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("mode", [None, "graphs"])
@pytest.mark.parametrize("name,chunk", [("debug-cat", None), ("debug-cat-adaptive", 4), ("debug-dense", None),
                                        ("debug-hybrid", None)])
def test_cuda_lean_blocks_equal_eager(name, chunk, mode, fold):
    """Lean blocks (cuBLAS + rope_attention + in-place residual GEMMs; fp32), eager and
    compiled in the runner's CUDA graphs: the model's eager tokens, logits to 1e-4, twice (the
    second run replays the graphs on new cache contents)."""
    model = _cuda(name)
    prompts = _prompts((6, 9, 13), seed=13)
    want = list(stream(model, prompts, 24, chunk_size=chunk))
    runner = make_runner(model, len(prompts), 13 + 24, chunk or model.args.chunk_size)
    assert any(runner.lean_linears(fold_norms=fold))
    if mode is not None:
        runner.compile_step(mode=mode)
    for _ in range(2):
        steps = list(stream(model, prompts, 24, chunk_size=chunk, runner=runner))
        assert [s.tokens.tolist() for s in steps] == [s.tokens.tolist() for s in want]
        assert max((a.logits - b.logits).abs().max().item() for a, b in zip(steps, want)) <= 1e-4
