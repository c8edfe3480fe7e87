#!/usr/bin/env python
"""Generation throughput and memory: CATs at several chunk sizes next to a dense baseline.

    python tools/bench_generate.py --cat-preset cat-150m --dense-preset dense-150m \\
        --chunk-sizes 8,32 --batch 64 --gen-len 2048 --dtype bf16 --compile --json out.json
    # CPU smoke test
    python tools/bench_generate.py --cat-preset debug-cat --dense-preset debug-dense \\
        --chunk-sizes 4,8 --batch 2 --prompt-len 8 --gen-len 16 --device cpu

Weights are random (speed does not depend on them). A fixed-chunk CAT preset is rebuilt at
each chunk size (``chunk_size`` replaced); an adaptive preset runs one model at each of its
valid sizes. block_size is raised where prompt + gen-len needs it. Every row starts from a
random prompt of --prompt-len tokens and decodes greedily for exactly --gen-len tokens
(no eos), so all rows stay aligned on chunk boundaries as in the reference benchmark.

tokens/s = batch * gen-len / (prefill + decode time), measured after a warm-up run on the
same runner (compiled graphs and caches are reused). Peak memory is
torch.cuda.max_memory_allocated over the timed run on CUDA; on CPU the process's peak
resident set size so far (it only grows across configurations, so it is an upper bound).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cat_titan.infer import generate, make_runner  # noqa: E402
from cat_titan.models.registry import build_model, get_preset  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _configs(a) -> list[tuple[str, str, object, int | None]]:
    """(label, preset, ModelArgs, chunk size at generation or None) for every run."""
    need = a.prompt_len + a.gen_len
    out = []
    if a.dense_preset:
        args = get_preset(a.dense_preset)
        out.append(("dense", a.dense_preset, args.replace(block_size=max(args.block_size, need)), None))
    if a.cat_preset:
        base = get_preset(a.cat_preset)
        if not base.is_cat:
            raise SystemExit(f"--cat-preset {a.cat_preset} is a {base.kind} model; pick a cat or cat_adaptive preset")
        for c in a.chunk_sizes:
            args = base if base.kind == "cat_adaptive" else base.replace(chunk_size=c)
            if base.kind == "cat_adaptive" and c not in base.chunk_sizes:
                raise SystemExit(f"--chunk-sizes: {c} is not valid for adaptive preset {a.cat_preset}; "
                                 f"valid: {list(base.chunk_sizes)}")
            step = args.chunk_size
            args = args.replace(block_size=max(args.block_size, -(-need // step) * step))
            out.append((f"{base.kind} C={c}", a.cat_preset, args, c if base.kind == "cat_adaptive" else None))
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def bench_one(a, label: str, preset: str, args, gen_chunk, device: torch.device) -> dict:
    gc.collect()  # the previous configuration's runner sits in a reference cycle
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build_model(args, device=device, seed=0).to(DTYPES[a.dtype]).eval()
    C = gen_chunk or (args.chunk_size if args.kind != "dense" else 0)
    B, P, n = a.batch, a.prompt_len, a.gen_len
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, args.vocab_size, (B, P), generator=g)
    runner = make_runner(model, B, P + n, C)
    if a.compile:
        runner.compile_step(mode="reduce-overhead" if a.cuda_graphs else None)
    kw = dict(chunk_size=gen_chunk, runner=runner)
    # Warm-up: long enough to cross a chunk boundary, so both step variants get compiled.
    t0 = time.perf_counter()
    generate(model, prompts, min(n, 2 * max(C, 1) + 2), **kw)
    _sync(device)
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        gc.collect()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(a.repeat):
        _sync(device)
        t0 = time.perf_counter()
        generate(model, prompts, n, **kw)
        _sync(device)
        times.append(time.perf_counter() - t0)
    sec = min(times)
    res = dict(model=label, preset=preset, kind=args.kind, chunk_size=C or None, batch=B, prompt_len=P, gen_len=n,
               dtype=a.dtype, compile=a.compile, cuda_graphs=a.cuda_graphs, seconds=sec,
               tokens_per_s=B * n / sec, ms_per_step=1e3 * sec / n, warmup_s=warm_s,
               cache_mib=runner.cache_bytes() / 2**20, cache_columns=max(c.columns for c in runner.caches()),
               peak_mem_gib=_peak_gib(device),
               peak_mem_kind="cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS")
    return res


def _table(rows: list[dict]) -> str:
    cols = [("model", "{}"), ("chunk_size", "{}"), ("batch", "{}"), ("gen_len", "{}"), ("tokens_per_s", "{:.1f}"),
            ("ms_per_step", "{:.2f}"), ("cache_columns", "{}"), ("cache_mib", "{:.1f}"), ("peak_mem_gib", "{:.2f}")]
    cells = [[c for c, _ in cols]] + [[f.format(r[c]) if r[c] is not None else "-" for c, f in cols] for r in rows]
    w = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w[i]) for i, v in enumerate(row)) for row in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cat-preset", default="cat-150m", help="cat or cat_adaptive preset ('' to skip)")
    p.add_argument("--dense-preset", default="dense-150m", help="dense baseline preset ('' to skip)")
    p.add_argument("--chunk-sizes", default="8,32", type=lambda s: [int(x) for x in s.split(",") if x])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--gen-len", type=int, default=2048)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--cuda-graphs", action="store_true", help="with --compile: mode='reduce-overhead'")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per configuration (the fastest counts)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.batch < 1 or a.prompt_len < 1 or a.gen_len < 1 or a.repeat < 1:
        p.error("--batch, --prompt-len, --gen-len and --repeat must be >= 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    rows = []
    for label, preset, args, gen_chunk in _configs(a):
        r = bench_one(a, label, preset, args, gen_chunk, device)
        rows.append(r)
        print(f"{label:>18}: {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, dtype {a.dtype}, compile {a.compile}, cuda graphs {a.cuda_graphs}, "
          f"prompt {a.prompt_len}, torch {torch.__version__}")
    print(_table(rows))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        a.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "args": cfg, "results": rows},
                                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
