"""Autoregressive generation with KV caches for every model kind.

    from cat_titan.infer import generate, stream
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, temperature=0.8, top_k=50,
                   eos_id=0, generator=torch.Generator().manual_seed(0))  # list of new-token lists
    for step in stream(model, prompts, 32, chunk_size=4):  # adaptive CAT at chunk size 4
        print(step.tokens[step.alive])

Batching prompts of different lengths: every row keeps its own positions (position 0 is
its first prompt token), so a CAT's chunk boundaries, RoPE ids and compressor chunk
indices are exactly those of the row generated alone. Prompts are right-padded for the
one batched prefill; pad positions are invisible to real ones (causal masks; a CAT token
only sees its own chunk and complete earlier chunks) and their cache entries are masked
until a row's own decoding overwrites them. Rows then advance in lockstep, one token
each per step, each at its own phase within its chunk; a row that emitted ``eos_id``
keeps computing (static batch) but its tokens are no longer part of the output, and the
loop ends once every row has stopped.

Cache sizes (per layer, columns of K/V; see runners.py): dense ``P + n`` (longest prompt +
new tokens); for L = P + n, CAT ``L // C + 1 + C`` (slots fx_0..fx_k, the current chunk),
adaptive CAT ``L // C + 1 + 1 + C + 1`` (also a separator and a scratch column).

Compilation: ``compile=True`` (or a torch.compile mode, e.g. 'reduce-overhead' for CUDA
graphs, or 'graphs' for CUDA graphs the runner captures itself, see
``Runner.compile_step``) compiles the decode step of the runner; it has static shapes (preallocated caches,
in-place indexed writes, masks from index comparisons) and at most three variants per
model (no chunk completes; every row completes one, the compressor inside the step; some
rows complete one). The prefill runs eagerly (FlexAttention on CUDA); when only some rows
complete a chunk, the compressor runs on them first, compiled with a dynamic batch. To reuse
compiled graphs and caches across calls, build a runner once with
``make_runner(model, batch, max_len, chunk_size)`` and pass ``runner=``. On an H200
(torch 2.11) the compiled and CUDA-graph steps give the eager tokens
(tests/infer/test_generate_cuda.py); tools/bench_generate.py measures them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

from .runners import Runner, make_runner
from .sampling import SamplingParams, sample

Prompts = Union[Tensor, Sequence[Sequence[int]], Sequence[int]]


@dataclass
class StepOutput:
    tokens: Tensor
    """(B,) the token each row sampled at this step."""
    alive: Tensor
    """(B,) bool: the row had not stopped before this step, so the token is part of its output
    (a row's eos token is alive; everything a row samples after it is not). Without an eos id
    every step yields the same all-true tensor: read it, don't modify it in place."""
    logits: Tensor
    """(B, V_padded) the logits the tokens were chosen from."""


def _as_lists(prompts: Prompts) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.dim() == 1:
            prompts = prompts[None]
        if prompts.dim() != 2 or prompts.is_floating_point():
            raise ValueError(f"prompts must be an integer tensor (batch, length) or a list of token lists; "
                             f"got {tuple(prompts.shape)} {prompts.dtype}")
        return prompts.tolist()
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt as a flat list
    return [list(p) for p in prompts]


def runner_chunk_size(model, chunk_size: Optional[int]) -> int:
    """The chunk size the runner needs (0 for dense models)."""
    kind = model.args.kind
    if kind == "cat_adaptive":
        return model.resolve_chunk_size(chunk_size)  # checks it against the valid sizes
    model.resolve_chunk_size(chunk_size)  # rejects a chunk size the model cannot take
    if kind == "cat":
        return model.args.chunk_size
    if kind == "cat_layer" and "cat" in model.args.layer_kinds():
        return model.args.chunk_size
    return 0


class Generation:
    """An iterator over the steps of one batched generation (``stream`` builds it).

    ``runner`` holds the caches (inspect ``runner.caches()``, ``runner.cache_bytes()``).
    """

    def __init__(self, model, prompts: Prompts, max_new_tokens: int, *, chunk_size: Optional[int] = None,
                 temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
                 eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
                 runner: Optional[Runner] = None, compile: Union[bool, str] = False,
                 vocab_size: Optional[int] = None):
        self.model = model
        self.vocab_size = vocab_size or model.args.vocab_size
        self.prompts = _as_lists(prompts)
        self.params = SamplingParams(temperature, top_k, top_p)
        self.params.validate()
        self.max_new_tokens = max_new_tokens
        self.eos_id = eos_id
        self.generator = generator
        args = model.args
        if not self.prompts:
            raise ValueError("no prompts given")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        lengths = [len(p) for p in self.prompts]
        if min(lengths) == 0:
            raise ValueError(f"prompt {lengths.index(0)} is empty; every prompt needs at least one token "
                             f"(e.g. a beginning-of-text id)")
        too_long = [i for i, n in enumerate(lengths) if n + max_new_tokens > args.block_size]
        if too_long:
            i = too_long[0]
            raise ValueError(f"prompt {i} has {lengths[i]} tokens; with max_new_tokens={max_new_tokens} the "
                             f"sequence would reach {lengths[i] + max_new_tokens} tokens, beyond the model's "
                             f"block_size {args.block_size}; shorten the prompt or lower max_new_tokens "
                             f"(at most {args.block_size - lengths[i]})")
        self.batch = B = len(self.prompts)
        self.max_len = max(lengths) + max_new_tokens
        C = runner_chunk_size(model, chunk_size)
        if runner is None:
            runner = make_runner(model, B, self.max_len, C)
            if compile:
                runner.compile_step(mode=None if compile is True else compile)
        elif runner.batch != B or runner.max_len < self.max_len or runner.chunk_size != C:
            raise ValueError(f"runner was built for batch {runner.batch}, max_len {runner.max_len}, chunk size "
                             f"{runner.chunk_size}; this generation needs batch {B}, max_len >= {self.max_len}, "
                             f"chunk size {C}: build it with make_runner(model, {B}, {self.max_len}, {C})")
        self.runner = runner
        # Right-padded prompts (B, Lp); a CAT prefill needs whole chunks.
        Lp = max(lengths)
        if C:
            Lp = -(-Lp // C) * C
        device = next(model.parameters()).device
        self.lengths_host = torch.tensor(lengths, dtype=torch.long)
        tokens = torch.zeros(B, Lp, dtype=torch.long)
        for i, p in enumerate(self.prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        model.check_tokens(tokens)  # id range (block_size is checked above)
        self.tokens = tokens.to(device)
        self.lengths = self.lengths_host.to(device)

    @torch.no_grad()
    def __iter__(self) -> Iterator[StepOutput]:
        n, eos = self.max_new_tokens, self.eos_id
        if n == 0:
            return
        vocab = self.vocab_size
        self.runner.refresh_gate_up()
        logits = self.runner.prefill(self.tokens, self.lengths)  # (B, V)
        pos, pos_host = self.lengths.clone(), self.lengths_host.clone()  # position of the token fed next
        stopped = torch.zeros(self.batch, dtype=torch.bool, device=pos.device)
        everyone = ~stopped  # without eos no row stops: one tensor for every step, no kernel per step
        for i in range(n):
            tok = sample(logits, self.params, vocab, self.generator)  # (B,)
            alive = everyone
            if eos is not None:
                alive = ~stopped
                stopped = stopped | (tok == eos)
            yield StepOutput(tok, alive, logits)
            # The eos check syncs with the device once per step; without eos_id none does.
            if i == n - 1 or (eos is not None and bool(stopped.all())):
                return
            logits = self.runner.step(tok, pos, pos_host)
            pos += 1
            pos_host += 1


def stream(model, prompts: Prompts, max_new_tokens: int, **kw) -> Generation:
    """Iterate over generation steps (``StepOutput`` per new token); keywords as ``generate``."""
    return Generation(model, prompts, max_new_tokens, **kw)


def generate(model, prompts: Prompts, max_new_tokens: int, *, chunk_size: Optional[int] = None,
             temperature: float = 0.0, top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             callback: Optional[Callable[[StepOutput], None]] = None, runner: Optional[Runner] = None,
             compile: Union[bool, str] = False, vocab_size: Optional[int] = None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens after each prompt; returns the new tokens
    per prompt (up to and including ``eos_id`` where a row emitted it).

    prompts: a (B, L) integer tensor, a list of token lists (any lengths) or one token list.
    chunk_size: adaptive CATs only (default: the largest); fixed-chunk models use their own.
    temperature 0 is greedy; otherwise sampling with optional top_k / top_p, drawn from
    ``generator`` (on the model's device) for reproducible runs.
    callback: called with each ``StepOutput`` (e.g. to stream text).
    runner / compile: reuse caches and compiled steps (``make_runner``) / compile a new runner.
    vocab_size: ids >= it are never chosen (default ``model.args.vocab_size``: the embedding's
    padding rows are excluded; the reference's own greedy loop takes the padded argmax).
    """
    gen = Generation(model, prompts, max_new_tokens, chunk_size=chunk_size, temperature=temperature, top_k=top_k,
                     top_p=top_p, eos_id=eos_id, generator=generator, runner=runner, compile=compile,
                     vocab_size=vocab_size)
    toks, alive = [], []
    for step in gen:
        if callback is not None:
            callback(step)
        toks.append(step.tokens)
        alive.append(step.alive)
    if not toks:
        return [[] for _ in range(gen.batch)]
    # one transfer at the end: no per-step device sync beyond the eos check
    toks_l, alive_l = torch.stack(toks, 1).tolist(), torch.stack(alive, 1).tolist()
    return [[t for t, a in zip(tr, ar) if a] for tr, ar in zip(toks_l, alive_l)]
