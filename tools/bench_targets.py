#!/usr/bin/env python
"""Every speed target of issues 7 and 8, measured side by side and checked, in one command.

    python tools/bench_targets.py --out DIR                       # all jobs this machine can run
    python tools/bench_targets.py --out DIR --only train-cat,gen-64 --repeat 3
    python tools/bench_targets.py --report DIR [DIR ...]          # the table from results already there
    python tools/bench_targets.py --out DIR --smoke               # CPU: tiny presets, the same plumbing

Each job is one process (tools/bench_train.py, under torchrun for the FSDP job, or
tools/bench_generate.py), so that no job inherits another's memory, graphs or allocator state.
Results accumulate in DIR/results.json (one entry per job, written as each job ends), every
job's output in DIR/log.txt, the verdicts in DIR/targets.md and DIR/targets.json. A job whose
result is already in DIR is not run again (--force reruns): an interrupted invocation, or one
split over several machines' time limits with --only, continues where it stopped, and --report
merges the results.json of several directories (later directories win).

Thresholds are the issues' H200 numbers (bf16, seq 2048, batch 8 per GPU for training; batch
64 x 2048 and 320 x 4096 new tokens for generation). A smoke run on CPU checks the plumbing:
its verdicts compare CPU numbers with H200 thresholds and say nothing about speed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# decode_flags is stdlib only: this tool imports no torch
from cat_titan.decode_flags import add_decode_path_args, decode_path_argv, decode_path_error  # noqa: E402

# The issues' reference numbers (one H200 unless stated).
REF_TRAIN_CAT_C8 = 75.8e3  # reference implementation, cat-150m, chunk 8, tokens/s
REF_TRAIN_PEAK_GB = 32.1  # ... its peak memory at batch 8
REF_GEN = {8: 49e3, 32: 70e3}  # reference harness, batch 64 x 2048 new tokens, tokens/s
TRAIN_SPEEDUP = 2.0  # >= 2x the reference (the issue writes it as >= 152k)
GEN_SPEEDUP = 2.0
FSDP_EFFICIENCY = 0.95  # 2 GPUs: per-GPU throughput >= 95% of one GPU's
ADAPTIVE_OVERHEAD = 0.05  # random curriculum <= 5% slower than the fixed sizes it mixes
GEN_LARGE_SPEEDUP, GEN_LARGE_MEMORY = 3.0, 9.0  # CAT-32 vs dense at batch 320 x 4096

TRAIN = "training.global_batch=8"  # batch 8 per GPU, as every reference number


@dataclass
class Job:
    name: str
    argv: list[str]  # after the interpreter
    gpus: int = 1
    note: str = ""
    env: dict = field(default_factory=dict)


def jobs(a) -> list[Job]:
    bt, bg = str(ROOT / "tools" / "bench_train.py"), str(ROOT / "tools" / "bench_generate.py")
    cfg = lambda name: str(ROOT / "configs" / name)
    if a.smoke:  # tiny presets on CPU; seq 64 keeps each job to seconds
        small = ["data.seq_len=64", "training.global_batch=2", "training.micro_batch=2", "training.compile=false"]
        steps = ["--steps", "2", "--warmup", "1"]
        c8, dense, adaptive = cfg("debug_cat.yaml"), cfg("debug_dense.yaml"), cfg("debug_cat_adaptive.yaml")
        dense_wide = ["model.preset=debug-dense"]
        gen = ["--cat-preset", "debug-cat", "--dense-preset", "debug-dense", "--device", "cpu", "--dtype", "fp32",
               "--prompt-len", "8"]
        gen64, gen320 = ["--batch", "2", "--gen-len", "32"], ["--batch", "3", "--gen-len", "64"]
        fsdp = small[:1] + ["training.global_batch=4", "training.micro_batch=2", "training.compile=false"]
    else:
        small, steps = [TRAIN], ["--steps", str(a.steps), "--warmup", str(a.warmup)]
        c8, dense, adaptive = cfg("cat_150m.yaml"), cfg("dense_150m.yaml"), cfg("cat_adaptive_150m.yaml")
        dense_wide = ["model.preset=dense-1536x12"]
        gen = ["--cat-preset", "cat-150m", "--dense-preset", "dense-150m", "--dtype", "bf16", "--compile",
               "--cuda-graphs"]
        gen64, gen320 = ["--batch", "64", "--gen-len", "2048"], ["--batch", "320", "--gen-len", "4096"]
        fsdp = ["training.global_batch=16"]  # 8 per GPU
    anchor = [] if a.no_anchor else ["--anchor", "torchtitan"]
    out = []
    for i in range(a.repeat):  # the CAT's throughput spreads ~1% run to run: the mean of several runs counts
        out.append(Job(f"train-cat-{i + 1}", [bt, "--config", c8, *steps, *(anchor if i == 0 else []), *small],
                       note="reference-sized CAT, chunk 8" + (" (+ torchtitan at the decoder's size)"
                                                              if i == 0 and anchor else "")))
    decode_path = decode_path_argv(a.lean, a.fold_norms)
    out += [
        Job("train-dense-768", [bt, "--config", dense, *steps, *anchor, *small], note="dense 768x12"),
        Job("train-dense-1536", [bt, "--config", dense, *steps, *anchor, *small, *dense_wide], note="dense 1536x12"),
        Job("train-adaptive", [bt, "--config", adaptive, *steps, "--vs-fixed", *small],
            note="adaptive CAT, random curriculum vs each size alone"),
        Job("train-fsdp", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", bt, "--config", c8,
                           *steps, *fsdp], gpus=2, note="reference-sized CAT, FSDP over 2 GPUs"),
        Job("gen-64", [bg, *gen, *gen64, "--chunk-sizes", "8,32", "--graph-mode", "runner", *decode_path],
            note="batch 64 x 2048 new tokens, runner CUDA graphs"),
        # cudagraph trees: runner graphs keep a pool per captured variant (session 4: +0.2 GiB)
        Job("gen-320", [bg, *gen, *gen320, "--chunk-sizes", "32", "--graph-mode", "trees", *decode_path],
            note="batch 320 x 4096 new tokens, cudagraph trees"),
    ]
    return out


def gpus_here() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_job(job: Job, out_dir: Path, log) -> dict:
    """Run one job with --json into a scratch file; returns {"ok", "seconds", "result" | "error"}."""
    tmp = out_dir / f".{job.name}.json"
    tmp.unlink(missing_ok=True)
    cmd = [sys.executable, *job.argv, "--json", str(tmp)]
    shown = " ".join(shlex.quote(str(Path(c).relative_to(ROOT)) if c.startswith(str(ROOT)) else c) for c in job.argv)
    log.write(f"\n===== {job.name}: {job.note}\n$ python {shown}\n")
    log.flush()
    t0 = time.time()
    r = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **job.env})
    entry = {"command": f"python {shown}", "note": job.note, "seconds": round(time.time() - t0, 1)}
    if r.returncode == 0 and tmp.exists():
        entry["result"] = json.loads(tmp.read_text())
        tmp.unlink()
    else:
        entry["error"] = f"exit status {r.returncode}; see log.txt"
    log.write(f"===== {job.name}: {'ok' if 'result' in entry else entry['error']} in {entry['seconds']} s\n")
    log.flush()
    return entry


# ------------------------------------------------------------------------------------- verdicts
def _row(name, target, value, threshold, ok, evidence, unit="tokens/s"):
    return {"target": name, "want": target, "value": value, "threshold": threshold, "unit": unit,
            "verdict": "not measured" if ok is None else ("met" if ok else "MISSED"), "evidence": evidence}


def _gen_row(result: dict, kind: str, chunk) -> dict | None:
    return next((r for r in result.get("results", []) if r["kind"].startswith(kind)
                 and (chunk is None or r["chunk_size"] == chunk)), None)


def evaluate(results: dict) -> list[dict]:
    """The issues' targets from the jobs' results (missing jobs: 'not measured')."""
    res = {k: v["result"] for k, v in results.items() if "result" in v}
    rows = []
    cats = [v for k, v in sorted(res.items()) if k.startswith("train-cat-")]
    cat_tps = statistics.mean(c["tokens_per_sec_per_device"] for c in cats) if cats else None
    spread = ", ".join(f"{c['tokens_per_sec_per_device']:,.0f}" for c in cats)
    want = TRAIN_SPEEDUP * REF_TRAIN_CAT_C8
    rows.append(_row("train: reference-sized CAT, chunk 8, one GPU", f">= {TRAIN_SPEEDUP}x the reference's 75.8k "
                     "tokens/s (mean of runs)", cat_tps, want, None if cat_tps is None else cat_tps >= want,
                     f"train-cat-* ({spread})" if cats else "train-cat-*"))
    first = res.get("train-cat-1", {})
    an = first.get("anchor")
    rows.append(_row("train: CAT MFU vs torchtitan Llama3 at the decoder's size (one formula)",
                     "CAT MFU >= torchtitan's, cat_titan's FLOP formula for both", first.get("mfu"),
                     an and an["mfu_cat_titan_flops"],
                     None if not an or first.get("mfu") is None or an["mfu_cat_titan_flops"] is None
                     else first["mfu"] >= an["mfu_cat_titan_flops"],
                     "train-cat-1 and its anchor" if an else "needs train-cat-1 with --anchor torchtitan", "%"))
    for key, label in (("train-dense-768", "768x12"), ("train-dense-1536", "1536x12")):
        d = res.get(key, {})
        an = d.get("anchor")
        rows.append(_row(f"train: dense {label} vs torchtitan Llama3", ">= torchtitan's tokens/s per GPU",
                         d.get("tokens_per_sec_per_device"), an and an["tokens_per_sec_per_device"],
                         None if not an else d["tokens_per_sec_per_device"] >= an["tokens_per_sec_per_device"],
                         key if an else f"needs {key} with --anchor torchtitan"))
    f = res.get("train-fsdp")
    ok = None if not (f and cat_tps) else f["tokens_per_sec_per_device"] >= FSDP_EFFICIENCY * cat_tps
    rows.append(_row("train: FSDP on 2 GPUs, per-GPU throughput", f">= {FSDP_EFFICIENCY:.0%} of one GPU's (train-cat "
                     "mean)", f and f["tokens_per_sec_per_device"], cat_tps and FSDP_EFFICIENCY * cat_tps, ok,
                     "train-fsdp vs train-cat-*"))
    peak = f and f.get("peak_mem_gb")
    rows.append(_row("train: FSDP on 2 GPUs, peak memory per GPU", f"< the reference's {REF_TRAIN_PEAK_GB} GB at "
                     "batch 8", peak, REF_TRAIN_PEAK_GB, None if peak is None else peak < REF_TRAIN_PEAK_GB,
                     "train-fsdp", "GB"))
    ad = res.get("train-adaptive", {}).get("vs_fixed")
    rows.append(_row("train: adaptive CAT, random curriculum", f"<= {ADAPTIVE_OVERHEAD:.0%} slower than the same "
                     "draws at fixed sizes", ad and ad["overhead"], ADAPTIVE_OVERHEAD,
                     None if not ad else ad["overhead"] <= ADAPTIVE_OVERHEAD, "train-adaptive (--vs-fixed)", "%"))
    g = res.get("gen-64", {})
    for c, ref in REF_GEN.items():
        r = _gen_row(g, "cat", c)
        want = GEN_SPEEDUP * ref
        rows.append(_row(f"generate: CAT chunk {c}, batch 64 x 2048", f">= {GEN_SPEEDUP}x the reference harness's "
                         f"{ref / 1e3:.0f}k tokens/s", r and r["tokens_per_s"], want,
                         None if not r else r["tokens_per_s"] >= want, "gen-64"))
    g = res.get("gen-320", {})
    cat, dense = _gen_row(g, "cat", 32), _gen_row(g, "dense", None)
    both = cat is not None and dense is not None
    speed = both and cat["tokens_per_s"] / dense["tokens_per_s"]
    mem = both and dense["peak_mem_gib"] and cat["peak_mem_gib"] and dense["peak_mem_gib"] / cat["peak_mem_gib"]
    rows.append(_row("generate: CAT-32 vs dense, batch 320 x 4096, speed", f">= {GEN_LARGE_SPEEDUP}x dense's "
                     "tokens/s", speed if both else None, GEN_LARGE_SPEEDUP,
                     None if not both else speed >= GEN_LARGE_SPEEDUP, "gen-320", "x"))
    rows.append(_row("generate: CAT-32 vs dense, batch 320 x 4096, peak memory", f">= {GEN_LARGE_MEMORY}x less than "
                     "dense's", mem or None, GEN_LARGE_MEMORY, None if not mem else mem >= GEN_LARGE_MEMORY,
                     "gen-320", "x"))
    return rows


def _fmt(v, unit: str) -> str:
    if v is None:
        return "-"
    return {"%": f"{v:+.1%}" if v < 0 else f"{v:.1%}", "GB": f"{v:.1f} GB", "x": f"{v:.2f}x"}.get(unit, f"{v:,.0f}")


def report(results: dict) -> str:
    rows = evaluate(results)
    devices = sorted({r["result"].get("device_name") or r["result"].get("device", "?")
                      for r in results.values() if "result" in r})
    torches = sorted({r["result"].get("torch", "?") for r in results.values() if "result" in r})
    lines = [f"device: {', '.join(devices) or '-'}; torch {', '.join(torches) or '-'}", "",
             "| target | want | value | threshold | verdict | from |", "| --- | --- | ---: | ---: | --- | --- |"]
    lines += [f"| {r['target']} | {r['want']} | {_fmt(r['value'], r['unit'])} | "
              f"{_fmt(r['threshold'], r['unit'])} | {r['verdict']} | {r['evidence']} |" for r in rows]
    lines += ["", "| job | seconds | command |", "| --- | ---: | --- |"]
    lines += [f"| {k} | {v['seconds']} | `{v['command']}`{'' if 'result' in v else ' (' + v['error'] + ')'} |"
              for k, v in results.items()]
    return "\n".join(lines) + "\n"


def load(dirs: list[Path]) -> dict:
    merged = {}
    for d in dirs:
        p = d / "results.json"
        if not p.exists():
            raise SystemExit(f"--report: {p} does not exist; give directories written by --out")
        merged.update(json.loads(p.read_text()))
    return merged


def write_report(results: dict, out: Path) -> str:
    text = report(results)
    (out / "targets.md").write_text(text)
    (out / "targets.json").write_text(json.dumps(evaluate(results), indent=1))
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="directory for results.json, log.txt, targets.md/.json")
    p.add_argument("--report", type=Path, nargs="+", metavar="DIR",
                   help="only write the verdicts from these directories' results.json (into --out, else the last)")
    p.add_argument("--only", default="", help="comma-separated job names (default: every job); see --list")
    p.add_argument("--list", action="store_true", help="print the jobs and their commands, run nothing")
    p.add_argument("--repeat", type=int, default=2, help="runs of the reference-sized CAT (their mean counts)")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--no-anchor", action="store_true", help="skip torchtitan (an optional dependency)")
    add_decode_path_args(p)
    p.add_argument("--smoke", action="store_true", help="tiny presets on CPU: checks the plumbing, not speed")
    p.add_argument("--force", action="store_true", help="rerun jobs whose results are already in --out")
    a = p.parse_args(argv)
    if a.repeat < 1 or a.steps < 1 or a.warmup < 0:
        p.error(f"--repeat {a.repeat} and --steps {a.steps} must be >= 1 and --warmup {a.warmup} >= 0")
    bad = decode_path_error(a.lean, a.fold_norms)
    if bad:
        p.error(bad)
    if a.report:
        results = load(a.report)
        out = a.out or a.report[-1]
        out.mkdir(parents=True, exist_ok=True)
        print(write_report(results, out), end="")
        return 0
    if not a.no_anchor and not a.list and importlib.util.find_spec("torchtitan") is None:
        if not a.smoke:  # before any work
            p.error("the torchtitan anchors need torchtitan (an optional benchmark dependency: pip install "
                    "torchtitan); install it or pass --no-anchor")
        print("smoke run without the torchtitan anchors: torchtitan is not installed here", flush=True)
        a.no_anchor = True
    all_jobs = jobs(a)
    names = [j.name for j in all_jobs]
    only = [s for s in a.only.split(",") if s]
    unknown = [s for s in only if s not in names]
    if unknown:
        p.error(f"--only: unknown job(s) {', '.join(unknown)}; jobs: {', '.join(names)}")
    todo = [j for j in all_jobs if not only or j.name in only]
    if a.list:
        for j in todo:
            print(f"{j.name} ({j.gpus} GPU{'s' if j.gpus > 1 else ''}): python {' '.join(j.argv)}")
        return 0
    if a.out is None:
        p.error("--out DIR is required (or --report DIR, or --list)")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    have = 2 if a.smoke else gpus_here()  # smoke: the FSDP job runs as 2 CPU processes (gloo)
    with open(a.out / "log.txt", "a") as log:
        for j in todo:
            if "result" in results.get(j.name, {}) and not a.force:
                print(f"{j.name}: already in {path}, skipped (--force reruns)", flush=True)
                continue
            if j.gpus > have:
                print(f"{j.name}: skipped, needs {j.gpus} GPUs and this machine has {have}", flush=True)
                continue
            print(f"{j.name}: {j.note} ...", flush=True)
            results[j.name] = run_job(j, a.out, log)
            path.write_text(json.dumps(results, indent=1))  # after every job: an interrupted run keeps the rest
            print(f"{j.name}: {'ok' if 'result' in results[j.name] else results[j.name]['error']} "
                  f"({results[j.name]['seconds']} s)", flush=True)
    print(write_report(results, a.out), end="")
    return 0 if all("result" in results[j.name] for j in todo if j.name in results) else 1


if __name__ == "__main__":
    sys.exit(main())
