"""Where a CUDA-graph generation's time goes between the runner's graph replays, and what moving
greedy sampling into the graphs would buy (issue 7; docs/benchmarks.md, session 25).

    python tools/experiments/generation_loop/bench_loop.py [CHUNK ...]   # default: 8 32

For the reference-sized CAT (cat-150m, bf16, batch 64, 8-token prompts, 2048 new tokens, compiled lean
step, runner graphs: what tools/bench_generate.py times), per chunk size:

1. split: CUDA events around every ``CUDAGraph.replay`` of a timed ``generate()``: the time inside the
   graphs per step variant, the prefill, and the time between replays (what runs eagerly per step: the
   logits clone, the argmax, the copies into the graph's inputs, ``pos += 1``);
2. in-graph greedy: graphs captured here that also take the argmax, store the token and advance the
   token / position inputs in place, (a) one per step, (b) one per chunk cycle of C steps; their tokens
   must equal ``generate()``'s.

An experiment, not a package path: it reaches into the runner (``_compiled``) and supports aligned
greedy batches without eos only.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import torch  # noqa: E402
from bench_generate import _configs  # noqa: E402  (the bench's model args for a preset and chunk size)

from cat_titan.infer.bench import SpeedConfig, build_runner, measure_generation, random_prompts  # noqa: E402
from cat_titan.infer.generate import Generation, generate  # noqa: E402
from cat_titan.models.registry import build_model  # noqa: E402

B, N, P = 64, 2048, 8


def timed(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, r


def event():
    return torch.cuda.Event(enable_timing=True)


def split(model, runner, prompts) -> None:
    """Part 1: graph time per variant, prefill, and the eager time between replays."""
    rec = []
    orig = torch.cuda.CUDAGraph.replay

    def replay(graph):
        e0, e1 = event(), event()
        e0.record()
        orig(graph)
        e1.record()
        rec.append((id(graph), e0, e1))

    for trial in range(2):
        rec.clear()
        s0, s1 = event(), event()
        torch.cuda.CUDAGraph.replay = replay
        try:
            torch.cuda.synchronize()
            s0.record()
            generate(model, prompts, N, runner=runner)
            s1.record()
            torch.cuda.synchronize()
        finally:
            torch.cuda.CUDAGraph.replay = orig
        us = 1e3  # Event.elapsed_time is in ms
        per: dict[int, list[float]] = {}
        for g, e0, e1 in rec:
            per.setdefault(g, []).append(e0.elapsed_time(e1) * us)
        inside = sum(sum(v) for v in per.values())
        between = [rec[i][2].elapsed_time(rec[i + 1][1]) * us for i in range(len(rec) - 1)]
        before = s0.elapsed_time(rec[0][1]) * us
        print(f"  split {trial}: {s0.elapsed_time(s1) * us / N:.1f} us/step; in graphs {inside / N:.1f} "
              f"({len(rec)} replays); prefill and set-up (before the first replay) {before:.0f} us; "
              f"between replays {sum(between) / N:.1f} us/step (median {sorted(between)[len(between) // 2]:.1f})")
        for v in per.values():
            v.sort()
            print(f"    a step variant, {len(v)} replays: median {v[len(v) // 2]:.1f}, min {v[0]:.1f}, "
                  f"max {v[-1]:.1f} us")


def in_graph(model, runner, prompts, C: int) -> None:
    """Part 2: greedy steps captured with their argmax and input updates, against generate()."""
    V = model.args.vocab_size
    runs = [timed(lambda: generate(model, prompts, N, runner=runner)) for _ in range(2)]
    ref, t_gen = torch.tensor(runs[0][1]), min(t for t, _ in runs)  # (B, N) tokens
    decode = runner._compiled["decode"]  # (runner, tok, pos, fx, compress_all) -> logits (B, V_padded)
    gen = Generation(model, prompts, 0, runner=runner)  # generate()'s padded prompts (B, Lp) and lengths (B,)
    padded, lengths = gen.tokens, gen.lengths
    tok, pos = (torch.zeros(B, dtype=torch.long, device="cuda") for _ in range(2))
    k, out = torch.zeros(1, dtype=torch.long, device="cuda"), torch.zeros(N, B, dtype=torch.long, device="cuda")

    def step(completes: bool) -> None:
        nxt = decode(runner, tok, pos, None, completes)[:, :V].argmax(-1)  # (B,)
        out.index_copy_(0, k, nxt[None])
        tok.copy_(nxt)
        pos.add_(1)
        k.add_(1)

    # Warm-up before capture, on a side stream (the runner does the same); it writes cache columns
    # that the prefill and later steps overwrite before anything reads them.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for completes in (False, True, False):
            step(completes)
    torch.cuda.current_stream().wait_stream(side)
    pool = torch.cuda.graph_pool_handle()
    per_step = {}
    for completes in (False, True):
        per_step[completes] = g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            step(completes)
    cycle = torch.cuda.CUDAGraph()  # C steps from the phase the prompts leave (every row aligned)
    with torch.cuda.graph(cycle, pool=pool):
        for j in range(C):
            step((P + j) % C == C - 1)

    def run(chunked: bool) -> torch.Tensor:
        runner.refresh_gate_up()
        first = runner.prefill(padded, lengths)[:, :V].argmax(-1)
        out[0] = first
        tok.copy_(first)
        pos.copy_(lengths)
        k.fill_(1)
        p, left = P, N - 1  # position fed next, steps left
        while chunked and left >= C:
            cycle.replay()
            p, left = p + C, left - C
        while left:
            per_step[p % C == C - 1].replay()
            p, left = p + 1, left - 1
        return out.t().cpu()

    for chunked in (False, True):
        res = [timed(lambda: run(chunked)) for _ in range(2)]
        t = min(t for t, _ in res)
        same = all(torch.equal(r, ref) for _, r in res)
        print(f"  {'one graph per chunk cycle' if chunked else 'one graph per step + argmax'}: "
              f"{B * N / t:,.0f} tokens/s ({t * 1e6 / N:.1f} us/step) vs generate() {B * N / t_gen:,.0f} "
              f"({t_gen * 1e6 / N:.1f}): {t_gen / t - 1:+.1%}; tokens equal: {same}")


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_loop.py times CUDA graphs: it needs a CUDA GPU", file=sys.stderr)
        return 2
    chunks = [int(c) for c in sys.argv[1:]] or [8, 32]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; cat-150m bf16, batch {B}, prompt {P}, "
          f"{N} new tokens")
    for C in chunks:
        [(_, _, args, _)] = _configs(SimpleNamespace(prompt_len=P, gen_len=N, dense_preset="", cat_preset="cat-150m",
                                                     chunk_sizes=[C]))
        model = build_model(args, device="cuda", seed=0).to(torch.bfloat16).eval()
        cfg = SpeedConfig(batch=B, prompt_len=P, gen_len=N, compile=True, cuda_graphs=True, graph_mode="runner")
        runner = build_runner(model, cfg, None)
        r = measure_generation(model, cfg, None, runner=runner)  # compiles, captures, times as the bench does
        print(f"C={C}: bench_generate's measurement {r['tokens_per_s']:,.0f} tokens/s, "
              f"{r['ms_per_step'] * 1e3:.1f} us/step")
        prompts = random_prompts(model, cfg)
        with torch.no_grad():
            split(model, runner, prompts)
            in_graph(model, runner, prompts, C)
        del runner, model
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
