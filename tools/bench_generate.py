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
The measuring code is cat_titan.infer.bench (tools/evaluate.py uses it too).

--profile DIR: after timing, profile --profile-steps decode steps of each configuration with
torch.profiler and write DIR/<config>.trace.json.gz (chrome trace), DIR/<config>.top.md (top
kernels per step, host CUDA calls and synchronisations per step, the compiled graph's kernel
and temporary-buffer counts) and DIR/<config>.graphs.py (inductor's code of the decode step),
plus DIR/summary.md / summary.json over all configurations (cat_titan.infer.profiling).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cat_titan.decode_flags import add_decode_path_args, decode_path_error  # noqa: E402
from cat_titan.infer.bench import SpeedConfig, build_runner, measure_generation, random_prompts  # noqa: E402
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


def bench_one(a, label: str, preset: str, args, gen_chunk, device: torch.device) -> tuple[dict, object]:
    model = build_model(args, device=device, seed=0).to(DTYPES[a.dtype]).eval()
    cfg = SpeedConfig(batch=a.batch, prompt_len=a.prompt_len, gen_len=a.gen_len, compile=a.compile,
                      cuda_graphs=a.cuda_graphs, graph_mode=a.graph_mode, autotune=a.autotune, repeat=a.repeat,
                      attend_bucket=a.attend_bucket, lean=a.lean, fold_norms=a.fold_norms)
    runner = build_runner(model, cfg, gen_chunk)
    if a.profile:  # keep the code of the graphs the warm-up compiles
        from cat_titan.infer.profiling import capture_graph_code

        with capture_graph_code() as codes:
            res = measure_generation(model, cfg, gen_chunk, runner=runner)
    else:
        res = measure_generation(model, cfg, gen_chunk, runner=runner)
    res = dict(model=label, preset=preset, **res)
    res["dtype"] = a.dtype
    if a.profile:
        from cat_titan.infer.profiling import profile_generation

        steps = min(a.gen_len, a.profile_steps)
        res["profile"] = profile_generation(model, runner, random_prompts(model, cfg), steps, gen_chunk, a.profile,
                                            label, graph_codes=codes)
    return res, model


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
    p.add_argument("--cuda-graphs", action="store_true", help="with --compile: CUDA graphs (see --graph-mode)")
    p.add_argument("--graph-mode", choices=["trees", "runner"], default="trees",
                   help="trees: torch.compile mode='reduce-overhead'; runner: each decode-step variant captured "
                        "by the runner (no per-step guards; cat_titan.infer.runners)")
    p.add_argument("--autotune", action="store_true",
                   help="with --compile: inductor max-autotune for the step's matmuls (slower compilation)")
    add_decode_path_args(p)
    p.add_argument("--blas", choices=("default", "cublas", "cublaslt"), default="default",
                   help="the library torch's matmuls (the decode step's GEMMs) go through "
                        "(torch.backends.cuda.preferred_blas_library; default: torch's, cuBLAS unless "
                        "TORCH_BLAS_PREFER_CUBLASLT=1)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per configuration (the fastest counts)")
    p.add_argument("--attend-bucket", type=int, default=None, metavar="N",
                   help="dense layers attend over the filled cache prefix rounded up to N columns (one graph "
                        "per bucket) instead of the whole cache")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="write a torch.profiler trace, a top-kernels table and the compiled graph per configuration")
    p.add_argument("--profile-steps", type=int, default=32, help="decode steps profiled per configuration (32)")
    a = p.parse_args(argv)
    if a.batch < 1 or a.prompt_len < 1 or a.gen_len < 1 or a.repeat < 1 or a.profile_steps < 1:
        p.error("--batch, --prompt-len, --gen-len, --repeat and --profile-steps must be >= 1")
    if a.cuda_graphs and not a.compile:
        p.error("--cuda-graphs needs --compile (CUDA graphs come from torch.compile mode='reduce-overhead')")
    if a.autotune and not a.compile:
        p.error("--autotune needs --compile")
    bad = decode_path_error(a.lean, a.fold_norms)
    if bad:
        p.error(bad)
    device = torch.device(a.device)
    if a.blas != "default":
        if device.type != "cuda":
            p.error(f"--blas {a.blas} picks a CUDA library; device is {device} (use --blas default)")
        torch.backends.cuda.preferred_blas_library(a.blas)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for label, preset, args, gen_chunk in _configs(a):
        r, model = bench_one(a, label, preset, args, gen_chunk, device)
        del model
        rows.append(r)
        print(f"{label:>18}: {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    blas = torch.backends.cuda.preferred_blas_library().name if device.type == "cuda" else "-"
    paths = "/".join(sorted({r["decode_paths"] for r in rows}))  # per model: "lean", "ops", "lean+ops" (hybrids)
    print(f"device {name}, dtype {a.dtype}, compile {a.compile} (autotune {a.autotune}), "
          f"cuda graphs {a.cuda_graphs} ({a.graph_mode}), decode paths {paths} "
          f"(norms folded {a.fold_norms}), blas {blas}, prompt {a.prompt_len}, torch {torch.__version__}")
    print(_table(rows))
    if a.profile:
        from cat_titan.infer.profiling import write_index

        write_index([r["profile"] for r in rows], a.profile)
        print(f"profiles: {a.profile}/summary.md (per configuration: *.top.md, *.trace.json.gz, *.graphs.py)")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        cfg = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
        a.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "args": cfg, "results": rows},
                                     indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
