#!/usr/bin/env python
"""Train one config under several parallel layouts, compile settings and activation-
checkpointing modes, and check that the loss curves agree; one command for the whole matrix.

    python tools/parallel_matrix.py --config configs/cat_150m.yaml --nproc 2 --out matrix \\
        --layouts fsdp,tp --compile on,off --ac none,full,every_n,selective --steps 50

Each run is ``torchrun --standalone --nproc_per_node=N train.py`` with the same data, seed,
global batch and schedule; layouts: ``fsdp`` (dp_shard=N), ``tp`` (tp=N, one data-parallel
rank), ``fsdp_tp`` (dp_shard=N/2 x tp=2), ``hsdp`` (2 replicas x dp_shard=N/2), ``hsdp_tp``
(2 x N/4 x tp=2). Every step is logged, so each run's curve has one
loss per step; the first run is the baseline the others are compared with. Throughput is the
median of the per-step tokens/s per device after --skip steps (compilation excluded).
Writes OUT/matrix.json and OUT/matrix.md; runs already in OUT/matrix.json are not repeated
(--only picks runs by name, e.g. fsdp-compile-none, so a long matrix can be split into calls).

Tolerance (bf16): layouts, fusions and checkpointing round differently, so single-step
losses differ by up to ~2% after 50 steps even where the math is identical (measured on the
reference-sized CAT: FSDP eager vs compiled, with and without AC: mean per-step difference
0.15-0.19%, last-10-step means within 0.11%). A run agrees when its mean per-step relative
difference and the relative difference of its last-10-step mean loss are both within --rtol
(default 0.5%, ~3x that noise floor).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ("fsdp", "tp", "fsdp_tp", "hsdp", "hsdp_tp")


def run_name(layout: str, compile_: str, ac: str) -> str:
    return f"{layout}-{'compile' if compile_ == 'on' else 'eager'}-{ac}"


def layout_overrides(layout: str, nproc: int, global_batch: int) -> list[str]:
    if layout == "fsdp":
        return ["parallelism.tp=1", f"training.micro_batch={global_batch // nproc}"]
    if layout == "tp":
        return [f"parallelism.tp={nproc}", f"training.micro_batch={global_batch}"]
    if layout == "fsdp_tp":
        return ["parallelism.tp=2", f"training.micro_batch={global_batch // (nproc // 2)}"]
    if layout == "hsdp":
        return ["parallelism.dp_replicate=2", "parallelism.tp=1", f"training.micro_batch={global_batch // nproc}"]
    if layout == "hsdp_tp":
        return ["parallelism.dp_replicate=2", "parallelism.tp=2",
                f"training.micro_batch={global_batch // (nproc // 2)}"]
    raise ValueError(layout)


def read_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in rows if "loss" in r and "eval" not in r]


def summarize(name: str, rows: list[dict], skip: int, rc: int, seconds: float) -> dict:
    steady = [r for r in rows if r["step"] > skip]

    def median(key):
        values = [r[key] for r in steady if r.get(key) is not None]
        return statistics.median(values) if values else None

    return {"name": name, "rc": rc, "seconds": round(seconds, 1), "steps": len(rows),
            "losses": [r["loss"] for r in rows], "tokens_per_sec_per_device": median("tokens_per_sec_per_device"),
            "mfu": median("mfu"), "peak_mem_gb": max((r.get("peak_mem_gb") or 0) for r in rows) if rows else None}


def compare(base: list[float], other: list[float], tail: int = 10) -> dict:
    """Per-step relative differences, and the difference of the means of the last ``tail``
    steps (single steps are noisy: one batch's loss moves with rounding)."""
    n = min(len(base), len(other))
    if not n:
        return {"max_abs": None, "max_rel": None, "mean_rel": None, "tail_rel": None}
    diffs = [abs(a - b) for a, b in zip(base[:n], other[:n])]
    rels = [d / abs(a) for d, a in zip(diffs, base[:n])]
    k = min(tail, n)
    tb, to = sum(base[n - k:n]) / k, sum(other[n - k:n]) / k
    return {"max_abs": max(diffs), "max_rel": max(rels), "mean_rel": sum(rels) / n, "tail_rel": abs(to - tb) / abs(tb)}


def render(results: list[dict], rtol: float, config: str, nproc: int) -> str:
    base = results[0] if results else None
    lines = [f"Loss-curve agreement and speed: `{config}` on {nproc} processes, baseline `{base['name']}`"
             if base else "no runs", "",
             "| run | steps | tokens/s per device | MFU | peak memory (GB) | max rel diff (one step) | "
             "mean rel diff | last-10 mean rel diff | agrees |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in results:
        c = compare(base["losses"], r["losses"]) if base else {}
        ok = (r["rc"] == 0 and r["steps"] == base["steps"] and c.get("mean_rel") is not None
              and c["mean_rel"] <= rtol and c["tail_rel"] <= rtol)
        r["agrees"] = ok
        r.update({f"vs_base_{k}": v for k, v in c.items()})
        status = "yes" if ok else (f"NO (exit {r['rc']})" if r["rc"] else "NO")
        tps = f"{r['tokens_per_sec_per_device']:,.0f}" if r["tokens_per_sec_per_device"] else "-"
        mfu = f"{r['mfu']:.1%}" if r.get("mfu") else "-"
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") else "-"
        pct = (lambda x: f"{x:.2%}" if x is not None else "-")
        lines.append(f"| {r['name']} | {r['steps']} | {tps} | {mfu} | {mem} | {pct(c.get('max_rel'))} | "
                     f"{pct(c.get('mean_rel'))} | {pct(c.get('tail_rel'))} | {status} |")
    lines += ["", f"Agrees: finished every step, and both the mean per-step relative loss difference and the "
                  f"relative difference of the last-10-step mean losses are within {rtol:.1%} of the baseline."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=None, help="run directories (default OUT/runs)")
    p.add_argument("--layouts", default="fsdp,tp")
    p.add_argument("--compile", default="on,off")
    p.add_argument("--ac", default="none,full,every_n,selective")
    p.add_argument("--only", default="", help="comma-separated run names to run (default: all)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--skip", type=int, default=10, help="steps excluded from the throughput median")
    p.add_argument("--rtol", type=float, default=0.005,
                   help="agreement tolerance (relative) on the mean per-step difference and the last-10 mean")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--stop-after", type=float, default=None,
                   help="start no new run after this many seconds (the rest stay for a later call)")
    p.add_argument("--device", default=None, help="job.device (default: the config's)")
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    a = p.parse_args()
    layouts = [x for x in a.layouts.split(",") if x]
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        p.error(f"--layouts: unknown {bad}; choose from {list(LAYOUTS)}")
    if a.global_batch % a.nproc:
        p.error(f"--global-batch={a.global_batch} must be divisible by --nproc={a.nproc}")
    a.out.mkdir(parents=True, exist_ok=True)
    work = a.work or a.out / "runs"
    store = a.out / "matrix.json"
    done = {r["name"]: r for r in json.loads(store.read_text())["runs"]} if store.is_file() else {}
    only = {x for x in a.only.split(",") if x}
    plan = [(lay, comp, ac) for comp, ac, lay in itertools.product(a.compile.split(","), a.ac.split(","), layouts)]
    results = []
    start = time.time()
    for lay, comp, ac in plan:
        name = run_name(lay, comp, ac)
        if name in done:
            results.append(done[name])
            print(f"[matrix] {name}: already measured", flush=True)
            continue
        if only and name not in only:
            continue
        if a.stop_after is not None and time.time() - start > a.stop_after:
            print(f"[matrix] {name}: not started (--stop-after {a.stop_after:.0f} s)", flush=True)
            continue
        run_dir = work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
               str(ROOT / "train.py"), "--config", a.config, f"job.run_dir={run_dir}",
               f"training.steps={a.steps}", f"training.global_batch={a.global_batch}",
               f"training.compile={'true' if comp == 'on' else 'false'}", f"training.activation_checkpoint={ac}",
               "metrics.log_interval=1", "metrics.tensorboard=false",
               "checkpoint.interval=0", "checkpoint.save_final=false", "checkpoint.resume=never",
               "training.eval_interval=0", "training.eval_batches=1", "training.sample_tokens=0",
               *layout_overrides(lay, a.nproc, a.global_batch), *([f"job.device={a.device}"] if a.device else []),
               *a.overrides]
        # One inductor cache per layout: a cache written under another process-group layout
        # once failed to resolve its process group.
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(work / f"inductor-{lay}"))
        print(f"[matrix] {name}: {' '.join(cmd[3:])}", flush=True)
        t0 = time.time()
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=a.timeout, capture_output=True, text=True)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, log = 124, f"timed out after {a.timeout}s\n{e.stdout or ''}{e.stderr or ''}"
        (a.out / f"{name}.log").write_text(log[-200_000:] if isinstance(log, str) else str(log))
        r = summarize(name, read_rows(run_dir), a.skip, rc, time.time() - t0)
        print(f"[matrix] {name}: rc {rc}, {r['steps']} steps, {r['tokens_per_sec_per_device'] or 0:,.0f} tokens/s "
              f"per device, peak {r['peak_mem_gb'] or 0:.1f} GB, {r['seconds']} s", flush=True)
        if rc:
            print("\n".join(log.splitlines()[-15:]), flush=True)
        results.append(r)
        done[name] = r
        store.write_text(json.dumps({"config": a.config, "nproc": a.nproc, "runs": list(done.values())}, indent=1))
    md = render(results, a.rtol, a.config, a.nproc)  # this invocation's plan; matrix.json keeps every run
    (a.out / "matrix.md").write_text(md)
    store.write_text(json.dumps({"config": a.config, "nproc": a.nproc, "rtol": a.rtol, "runs": list(done.values())},
                                indent=1))
    print(md, flush=True)
    return 0 if results and all(r.get("agrees") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
