#!/usr/bin/env python
r"""Time cat_titan's real training step: the Trainer of train.py (parallelize, compile, fused
loss, clipping, optimizer step), fed random tokens, after warm-up.

    python tools/bench_train.py --config configs/cat_150m.yaml [key=value ...] [--steps 20 --warmup 5]
    torchrun --standalone --nproc_per_node=2 tools/bench_train.py --config configs/cat_150m.yaml \
        training.global_batch=16
    python tools/bench_train.py --config configs/cat_adaptive_150m.yaml training.global_batch=8 --vs-fixed

Prints tokens/s per GPU, MFU (registry.flops_per_token over the measured time, peak bf16
FLOP/s of the device from cat_titan.train.metrics.PEAK_FLOPS), peak memory, the spread
of step times and every step's time, and on CUDA how far the host ran ahead of the device
(near 0: host-bound) and the GPU's SM clock and power draw over the timed steps (NVML, where
nvidia-ml-py is installed: tells a power-capped machine from a slow step); --json writes
them. --vs-fixed (adaptive CATs) then times each chunk size alone and compares the random
curriculum with the same draws at fixed sizes. Runs on CPU too (smoke test, no MFU).
"""

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


class RandomTokens:
    """Stands in for the data loader: uniform random ids, generated on the device."""

    def __init__(self, vocab: int, micro_batch: int, seq_len: int, device, seed: int):
        self.shape = (micro_batch, seq_len)
        self.vocab, self.device = vocab, device
        self.gen = torch.Generator(device=device).manual_seed(seed)

    def next_batch(self):
        x = torch.randint(0, self.vocab, self.shape, device=self.device, generator=self.gen)
        return x, torch.roll(x, -1, dims=1)


KERNEL_KINDS = [  # (category, substrings of CUDA kernel names), first match wins
    ("nccl (communication)", ("nccl",)),
    ("flex attention", ("flex_attention", "flex_decoding")),
    ("sdpa attention", ("flash", "fmha", "attention", "cudnn")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "cublas")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("liger kernels", ("_rms_norm", "_swiglu", "_rope", "cross_entropy", "liger", "element_mul")),
    ("compressor attention (cat_titan triton)", ("chunk_attn",)),
    ("inductor fused (triton)", ("triton_",)),
    ("eager elementwise/reduce/copy", ("elementwise", "vectorized", "reduce", "copy", "fill", "index", "cat",
                                        "scatter", "gather", "memcpy", "memset")),
]


def kernel_breakdown(prof, steps: int, wall_s: float) -> dict:
    """Device time per step by kernel category, and how busy the GPU was over the wall time."""
    from cat_titan.infer.profiling import kernel_rows

    by_kind: dict = {}
    for row in kernel_rows(prof, steps, "cuda"):
        name = row["name"].lower()
        kind = next((k for k, subs in KERNEL_KINDS if any(s in name for s in subs)), "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + row["us_per_step"] / 1e3  # ms per step
    busy, wall_ms = sum(by_kind.values()), wall_s * 1e3 / steps
    return {"wall_ms_per_step": wall_ms, "kernel_ms_per_step": busy, "gpu_busy_fraction": busy / wall_ms,
            "ms_per_step_by_kind": dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))}


def profile_steps(trainer, device, out: Path, steps: int = 3) -> dict:
    """Trace a few steps; rank r writes trace-r.json.gz, ops-r.txt (top ops by device time)
    and returns the kernel-time breakdown."""
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=False) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            out_ = trainer.train_step()
        float(out_["loss"])
        wall = time.perf_counter() - t0
    rank = trainer.pdims.rank
    prof.export_chrome_trace(str(out / f"trace-{rank}.json.gz"))
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    (out / f"ops-{rank}.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90))
    if device.type != "cuda":
        return {}
    from cat_titan.infer.profiling import idle_gaps, trace_device_spans

    summary = kernel_breakdown(prof, steps, wall)
    summary["idle"] = idle_gaps(trace_device_spans(out / f"trace-{rank}.json.gz"))
    (out / f"breakdown-{rank}.json").write_text(json.dumps(summary, indent=1))
    return summary


def warm_and_time(trainer, warmup: int, steps: int, device, sampler=None):
    """``warmup`` untimed steps (compilation happens there), a sync so that the device is idle
    when the timer starts, then ``steps`` timed steps (metrics.time_steps), inside ``sampler``
    (a metrics.GpuSampler) when given."""
    from cat_titan.train.metrics import time_steps

    for _ in range(warmup):
        trainer.train_step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    with sampler or contextlib.nullcontext():
        return time_steps(trainer.train_step, steps, device)


def time_fixed_sizes(trainer, warmup: int, steps: int, device) -> dict:
    """Mean step seconds of each chunk size of the trainer's curriculum alone: the same
    process, graphs and optimizer, a fixed curriculum swapped in, timed as the main run."""
    from cat_titan.train.curriculum import ChunkCurriculum

    mixed, out = trainer.curriculum, {}
    try:
        for c in mixed.sizes:
            trainer.curriculum = ChunkCurriculum([c], "fixed")
            out[c] = warm_and_time(trainer, warmup, steps, device).wall / steps
    finally:
        trainer.curriculum = mixed
    return out


def compare_with_fixed(step_sizes: list[list[int]], random_step_s: float, fixed: dict,
                       tokens_per_step: float) -> dict:
    """The random curriculum's mean step against what its own draws cost at fixed sizes: a
    step of micro-steps at sizes c_1..c_m is expected to take the mean of the fixed steps'
    times (exact with one micro-step per step). tokens_per_step: per device."""
    from collections import Counter

    expected = statistics.mean(statistics.mean(fixed[c] for c in cs) for cs in step_sizes)
    return {
        "random_step_s": random_step_s, "fixed_step_s": expected, "overhead": random_step_s / expected - 1,
        "draws": dict(sorted(Counter(c for cs in step_sizes for c in cs).items())),
        "sizes": {c: {"step_s": t, "tokens_per_sec_per_device": tokens_per_step / t} for c, t in fixed.items()},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps (one host sync, at the end)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", type=Path,
                   help="also trace 3 steps with torch.profiler: chrome trace, top ops table, device idle gaps")
    p.add_argument("--anchor", choices=["torchtitan"], default=None,
                   help="then time torchtitan's Llama3 at the model's dense size (the CAT's decoder) in the same "
                        "process group (tools/torchtitan_anchor.py; torchtitan is an optional dependency)")
    p.add_argument("--vs-fixed", action="store_true",
                   help="adaptive CATs: then time each chunk size of the curriculum alone (same process, same "
                        "number of steps) and compare the random curriculum's mean step with the same draws at "
                        "fixed sizes (issue 8's 5%% target)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.anchor:  # fail before any work when the optional dependency is missing
        import torchtitan_anchor as anchor  # tools/, this script's directory

        anchor._import_torchtitan()

    from cat_titan.config import load_config
    from cat_titan.models.registry import flops_per_token
    from cat_titan.train.metrics import GpuSampler, mfu, peak_flops, percent, step_time_stats
    from cat_titan.train.trainer import Trainer, preflight

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(a.config, [*a.overrides, f"job.run_dir={tmp}/run", "checkpoint.resume=never",
                                     "metrics.tensorboard=false", f"training.steps={a.steps + a.warmup}"])
        if a.vs_fixed:
            margs = cfg.model.args()
            if margs.kind != "cat_adaptive":
                p.error(f"--vs-fixed compares an adaptive CAT's curriculum with its fixed chunk sizes, but "
                        f"{a.config} builds a {margs.kind!r} model; drop --vs-fixed or pass an adaptive config")
            cfg.training.steps += len(margs.chunk_sizes) * (a.warmup + a.steps)  # the schedule covers them too
        device, _ = preflight(cfg)
        trainer = Trainer(cfg, device, None)
        t = cfg.training
        trainer.loader = RandomTokens(cfg.model.vocab_size, t.micro_batch, cfg.data.seq_len, device,
                                      t.seed + trainer.pdims.rank)
        # No host sync inside the timed window (the trainer's loop has none between log
        # steps): CUDA events between steps give the per-step spread, one sync at the end.
        if trainer.curriculum is not None:  # compile every chunk size before timing
            x, y = trainer.loader.next_batch()
            for c in trainer.curriculum.sizes:  # the step's own forward/backward (precision, TP loss)
                trainer.forward_backward(x, y, c)
            trainer.optimizer.zero_grad(set_to_none=True)
        cuda = device.type == "cuda"
        with trainer.gc:  # as in Trainer.run
            gpu = GpuSampler(device)
            wall, times, outs, lead = warm_and_time(trainer, a.warmup, a.steps, device, gpu)
            step_sizes = [[c for c in o["chunk_sizes"] if c is not None] for o in outs]
            sizes = [c for cs in step_sizes for c in cs]
            del outs
            breakdown = profile_steps(trainer, device, a.profile) if a.profile else None
            fixed = time_fixed_sizes(trainer, a.warmup, a.steps, device) if a.vs_fixed else None
        world = trainer.pdims.world
        tokens_per_step = t.global_batch * cfg.data.seq_len
        stats = step_time_stats(wall, times, a.steps, lead)
        mean_step, median = stats["step_s_mean"], stats["step_s_median"]
        tps_gpu = tokens_per_step / mean_step / world
        if sizes:  # adaptive: average FLOPs over the chunk sizes actually drawn
            flops = statistics.mean(flops_per_token(trainer.model_args, cfg.data.seq_len, c) for c in sizes)
        else:
            flops = flops_per_token(trainer.model_args, cfg.data.seq_len)
        peak = peak_flops(device)
        row = {
            "config": a.config, "overrides": a.overrides, "world": world, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "mixed_precision": trainer.mixed_precision,
            "tokens_per_sec_per_device": tps_gpu,
            "mfu": mfu(tps_gpu, flops, peak), "flops_per_token": flops,
            **stats,
            "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "chunk_sizes": sorted(set(sizes)) or None, "profile": breakdown,
            "gpu": gpu.summary(), "gpu_error": gpu.error,  # this rank's GPU over the timed steps, or why not
        }
        if fixed is not None:
            row["vs_fixed"] = compare_with_fixed(step_sizes, mean_step, fixed, tokens_per_step / world)
            for c, r in row["vs_fixed"]["sizes"].items():
                r["mfu"] = mfu(r["tokens_per_sec_per_device"], flops_per_token(trainer.model_args, cfg.data.seq_len, c),
                               peak)
        is_main = trainer.is_main
        if is_main:
            mem = f"{row['peak_mem_gb']:.1f} GB" if row["peak_mem_gb"] is not None else "n/a"
            print(f"{a.config} {' '.join(a.overrides)}: {tps_gpu:,.0f} tokens/s per device, "
                  f"MFU {percent(row['mfu'])}, peak {mem}, step {mean_step * 1e3:.1f} ms (median {median * 1e3:.1f}, "
                  f"min {row['step_s_min'] * 1e3:.1f}, max {row['step_s_max'] * 1e3:.1f}) on {world} x "
                  f"{row['device_name']}, mixed precision {row['mixed_precision']}", flush=True)
            print("  step times, ms: " + " ".join(f"{x * 1e3:.1f}" for x in row["step_s"]), flush=True)
            if lead is not None:
                print(f"  host ahead of the device at step ends: min {row['host_lead_s_min'] * 1e3:.1f} ms, median "
                      f"{row['host_lead_s_median'] * 1e3:.1f} ms (near 0: the device waits for the host)", flush=True)
            g = row["gpu"]
            if g is not None:
                at_limit = (f"; at the limit in {g['at_power_limit_fraction']:.0%} of {g['samples']} samples"
                            if g["at_power_limit_fraction"] is not None else "")
                limit = f" (limit {g['power_limit_w']:.0f} W{at_limit})" if g["power_limit_w"] else ""
                print(f"  GPU over the timed steps: SM clock mean {g['sm_clock_mhz_mean']:.0f} MHz (min "
                      f"{g['sm_clock_mhz_min']:.0f}, max {g['sm_clock_mhz_max']:.0f}), power mean "
                      f"{g['power_w_mean']:.0f} W, max {g['power_w_max']:.0f} W{limit}", flush=True)
            elif cuda:
                print(f"  GPU clock and power not sampled: {row['gpu_error']}", flush=True)
            if fixed is not None:
                vs = row["vs_fixed"]
                print("  fixed chunk sizes: " + ", ".join(
                    f"{c}: {r['step_s'] * 1e3:.1f} ms ({r['tokens_per_sec_per_device']:,.0f} tokens/s, MFU "
                    f"{percent(r['mfu'])})" for c, r in vs["sizes"].items()), flush=True)
                print(f"  random curriculum {vs['random_step_s'] * 1e3:.1f} ms/step against "
                      f"{vs['fixed_step_s'] * 1e3:.1f} for the same draws at fixed sizes: "
                      f"{vs['overhead']:+.1%} (draws: "
                      + ", ".join(f"{c} x{n}" for c, n in vs["draws"].items()) + ")", flush=True)
            if breakdown:
                print(f"  profile: {breakdown['wall_ms_per_step']:.1f} ms/step wall, kernels "
                      f"{breakdown['kernel_ms_per_step']:.1f} ms (GPU busy {breakdown['gpu_busy_fraction']:.0%}): "
                      + ", ".join(f"{k} {v:.1f}" for k, v in breakdown["ms_per_step_by_kind"].items()), flush=True)
                idle = breakdown["idle"]
                print(f"  device idle {idle['idle_ms']:.1f} of {idle['span_ms']:.1f} ms traced, by gap: "
                      + ", ".join(f"{k} {v:.1f} ms" for k, v in idle["idle_ms_by_gap"].items())
                      + "; largest: " + ", ".join(f"{g['us']:.0f} us at {g['at_ms']:.1f} ms"
                                                  for g in idle["largest_gaps"][:4]), flush=True)
        if a.anchor:
            args = trainer.model_args
            acfg = anchor.AnchorConfig(dim=args.dim, layers=args.n_layers, heads=args.n_heads,
                                       kv_heads=args.n_kv_heads, vocab=cfg.model.vocab_size, seq_len=cfg.data.seq_len,
                                       local_batch=t.micro_batch, steps=a.steps, warmup=a.warmup,
                                       compile=t.compile, seed=t.seed)
            del trainer  # free our model, optimizer state and activations first
            if cuda:
                torch.cuda.empty_cache()
            row["anchor"] = anchor.run_anchor(acfg, device)
            if is_main:
                print("  anchor: " + anchor.describe(row["anchor"]), flush=True)
        if is_main and a.json:
            a.json.write_text(json.dumps(row, indent=1))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
