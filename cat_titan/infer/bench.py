"""Generation speed and memory of one model at one chunk size: what tools/bench_generate.py
(random weights, many presets) and tools/evaluate.py (trained models, next to their
validation loss) both report.

    from cat_titan.infer.bench import SpeedConfig, measure_generation
    row = measure_generation(model, SpeedConfig(batch=64, gen_len=2048, compile=True, cuda_graphs=True),
                             chunk_size=8)
    row["tokens_per_s"], row["ms_per_step"], row["peak_mem_gib"]

Every row starts from a random prompt of ``prompt_len`` tokens and decodes greedily for exactly
``gen_len`` tokens (no eos), so all rows stay aligned on chunk boundaries as in the reference
benchmark. tokens/s = batch * gen_len / (prefill + decode time), the fastest of ``repeat`` runs
after a warm-up run on the same runner (compiled graphs and caches are reused; the warm-up
crosses a chunk boundary so every step variant is compiled before timing).

Memory: ``peak_mem_gib`` is ``torch.cuda.max_memory_allocated`` over the timed runs on CUDA
(weights, caches, activations); on CPU the process's peak resident set size so far (it only
grows, so it is an upper bound shared by every configuration of a process).
``state_mem_gib`` (weights + caches, exact on any device) is what differs between chunk
sizes on CPU.
"""

from __future__ import annotations

import gc
import resource
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..decode_flags import FIELDS, decode_path_error, lean_requested
from ..parallel.parallelize import compiled_graphs
from .generate import generate, runner_chunk_size
from .runners import Runner, make_runner


@dataclass
class SpeedConfig:
    batch: int = 64
    """Rows generated together."""
    prompt_len: int = 8
    """Tokens of each row's random prompt."""
    gen_len: int = 2048
    """New tokens per row (no eos: every row runs to the end)."""
    compile: bool = False
    """torch.compile the decode step."""
    cuda_graphs: bool = False
    """With compile: CUDA graphs, made as ``graph_mode`` says."""
    graph_mode: str = "trees"
    """'trees': torch.compile's (mode='reduce-overhead'); 'runner': captured by the runner per
    step variant (``Runner.compile_step(mode='graphs')``, CUDA only)."""
    autotune: bool = False
    """With compile: inductor's max-autotune for the step's matmuls (``Runner.compile_step``)."""
    lean: Optional[bool] = None
    """Each block as the lean path (``Runner.lean_linears``: cuBLAS matmuls, RoPE + cache writes
    + attention in one kernel, residual adds inside the GEMMs; CUDA, else the same ops).
    None: ``Runner.compile_step``'s default (lean where compiled on CUDA if
    ``runners.LEAN_BY_DEFAULT``, the model's ops elsewhere); False: the model's ops."""
    fold_norms: bool = False
    """With the lean path (lean not False): the norm weights folded into wqkv and w1|w3 (extra
    memory)."""
    repeat: int = 1
    """Timed runs; the fastest counts."""
    seed: int = 0
    """Seed of the random prompts."""
    attend_bucket: Optional[int] = None
    """Dense layers attend over the filled cache prefix rounded up to this many columns
    (one compiled graph per bucket; see runners.StackRunner); None: the whole cache."""

    def validate(self) -> None:
        bad = [f"{k}={v}" for k, v in (("batch", self.batch), ("prompt_len", self.prompt_len),
                                         ("gen_len", self.gen_len), ("repeat", self.repeat)) if v < 1]
        if bad:
            raise ValueError(f"generation benchmark settings must be >= 1: {', '.join(bad)}")
        if self.cuda_graphs and not self.compile:
            raise ValueError("cuda_graphs needs compile (CUDA graphs come from torch.compile mode='reduce-overhead')")
        if self.autotune and not self.compile:
            raise ValueError("autotune needs compile (it is a torch.compile mode)")
        bad = decode_path_error(self.lean, self.fold_norms, FIELDS)
        if bad:
            raise ValueError(bad)
        if self.graph_mode not in ("trees", "runner"):
            raise ValueError(f"graph_mode={self.graph_mode!r}: choose 'trees' (torch.compile's CUDA graphs) or "
                             f"'runner' (captured by the runner)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_mem_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def random_prompts(model, cfg: SpeedConfig) -> torch.Tensor:
    g = torch.Generator().manual_seed(cfg.seed)
    return torch.randint(0, model.args.vocab_size, (cfg.batch, cfg.prompt_len), generator=g)


def build_runner(model, cfg: SpeedConfig, chunk_size: Optional[int]) -> Runner:
    """A runner for ``cfg``'s batch and length, compiled as ``cfg`` says."""
    runner = make_runner(model, cfg.batch, cfg.prompt_len + cfg.gen_len, runner_chunk_size(model, chunk_size),
                         attend_bucket=cfg.attend_bucket)
    if lean_requested(cfg.lean, cfg.fold_norms):
        runner.lean_linears(fold_norms=cfg.fold_norms)
    if cfg.compile:
        graphs = "graphs" if cfg.graph_mode == "runner" else "reduce-overhead"
        runner.compile_step(mode=graphs if cfg.cuda_graphs else None, autotune=cfg.autotune, lean=cfg.lean)
    return runner


@torch.no_grad()
def measure_generation(model, cfg: SpeedConfig, chunk_size: Optional[int] = None,
                       runner: Optional[Runner] = None) -> dict:
    """Time greedy generation of ``cfg.gen_len`` tokens for ``cfg.batch`` random prompts.

    chunk_size: adaptive CATs only (others use their own). Returns a JSON-safe dict.
    """
    cfg.validate()
    need = cfg.prompt_len + cfg.gen_len
    if need > model.args.block_size:
        raise ValueError(f"prompt_len + gen_len = {need} exceeds the model's block_size {model.args.block_size}; "
                         f"lower gen_len to at most {model.args.block_size - cfg.prompt_len}")
    device = model_device(model)
    gc.collect()  # an earlier configuration's runner may sit in a reference cycle
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if runner is None:
        runner = build_runner(model, cfg, chunk_size)
    prompts = random_prompts(model, cfg)
    C = runner.chunk_size
    kw = dict(chunk_size=chunk_size, runner=runner)
    # Warm-up: crosses a chunk boundary (both step variants compile); with attend buckets the
    # whole length, so that no bucket's graph compiles while timed.
    warm = cfg.gen_len if getattr(runner, "attend_bucket", None) else min(cfg.gen_len, 2 * max(C, 1) + 2)
    t0 = time.perf_counter()
    generate(model, prompts, warm, **kw)
    sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
    graphs_before = compiled_graphs()
    times = []
    for _ in range(cfg.repeat):
        sync(device)
        t0 = time.perf_counter()
        generate(model, prompts, cfg.gen_len, **kw)
        sync(device)
        times.append(time.perf_counter() - t0)
    sec = min(times)
    cache = runner.cache_bytes()
    return dict(kind=model.args.kind, chunk_size=C or None, batch=cfg.batch, prompt_len=cfg.prompt_len,
                attend_bucket=getattr(runner, "attend_bucket", None),
                gen_len=cfg.gen_len, dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                device=device.type, compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
                graph_mode=cfg.graph_mode if cfg.cuda_graphs else None, autotune=cfg.autotune,
                lean="lean" in runner.decode_paths, fold_norms=cfg.fold_norms,
                decode_paths="+".join(sorted(set(runner.decode_paths))), seconds=sec,
                tokens_per_s=cfg.batch * cfg.gen_len / sec, ms_per_step=1e3 * sec / cfg.gen_len, warmup_s=warm_s,
                recompiles_while_timed=compiled_graphs() - graphs_before,
                cache_mib=cache / 2**20, cache_columns=max(c.columns for c in runner.caches()),
                state_mem_gib=(cache + param_bytes(model)) / 2**30, peak_mem_gib=peak_mem_gib(device),
                peak_mem_kind="cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS")

