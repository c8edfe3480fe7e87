#!/usr/bin/env python
"""The end-to-end study, one command: a dense Transformer, a CAT (chunk 8) and an adaptive CAT
(chunks 4..32, random curriculum) trained on the same tokens for the same budget, exported,
and evaluated side by side: validation loss curves, the adaptive model's loss at every chunk
size, generation speed and memory per chunk size. Writes markdown + PNGs ready for
docs/study.md.

    python tools/study.py --out study_out                       # one H200: configs/*_150m.yaml
    python tools/study.py --out /tmp/smoke --smoke --device cpu   # CPU, debug presets, a few steps (CI)

Phases (--phases, default all): ``train`` runs train.py once per model, in a subprocess, with
the config file plus overrides that give all three the same data, seed, batch, sequence
length, schedule and step budget (--steps; --minutes caps each run's wall clock: train.py is
sent SIGTERM, saves a checkpoint at the end of its step and exits 75, and the study carries
on with what it reached); ``export`` writes each run's final weights to one .safetensors file
(cat_titan.export); ``eval`` evaluates the exported models (cat_titan.infer.evaluate: the
trainer's validation loss on --eval-batches batches, then greedy generation of --gen-len
tokens for --gen-batch random prompts, compiled with CUDA graphs on CUDA); ``report`` writes
OUT/study.md, OUT/study_loss_curves.png, OUT/study_quality_vs_cost.png, OUT/eval.csv and OUT/results.json.
The report is rewritten after every phase, so an interrupted study still leaves one.

Re-running with the same --work directory skips what is done (finished runs, exports whose
step matches, evaluations with the same settings), so a study cut short by a time limit
continues where it stopped: a SIGTERM (e.g. ``timeout 560 python tools/study.py ...``) is passed
on to the running train.py, which saves a checkpoint (runs also save every steps/3) that the
next invocation resumes; the report is written and the study exits 75. OUT/results.json holds
everything the report needs (metrics rows included): ``--phases report`` redraws the figures
from it alone, e.g. on a machine with matplotlib after a run on one without.

Data: --data DIR (prepared shards), else the embedded corpus (this Python's standard library,
byte tokenizer), prepared once by ensure_corpus: no network needed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXIT_PREEMPTED = 75  # train.py: stopped by SIGTERM after saving a checkpoint
PHASES = ("train", "export", "eval", "report")


@dataclass
class ModelSpec:
    name: str
    config: str
    description: str


GPU_MODELS = [ModelSpec("dense", "configs/dense_150m.yaml", "dense Transformer++ 768x12"),
              ModelSpec("cat", "configs/cat_150m.yaml", "CAT, chunk 8 (decoder 1536x12, compressor 768x3)"),
              ModelSpec("cat_adaptive", "configs/cat_adaptive_150m.yaml",
                        "adaptive CAT, chunks 4..32 (uniform random curriculum)")]
SMOKE_MODELS = [ModelSpec("dense", "configs/debug_dense.yaml", "debug dense"),
                ModelSpec("cat", "configs/debug_cat.yaml", "debug CAT, chunk 8"),
                ModelSpec("cat_adaptive", "configs/debug_cat_adaptive.yaml", "debug adaptive CAT, chunks 2..8")]


class Interrupted(Exception):
    """SIGTERM reached the study: stop after the running train.py has saved its state."""


class Stop:
    """Remembers a termination request and passes it on to the running train.py."""

    def __init__(self):
        self.requested = False
        self.child: subprocess.Popen | None = None
        signal.signal(signal.SIGTERM, self._handle)  # Ctrl-C (SIGINT) reaches train.py directly

    def _handle(self, signum, frame):
        self.requested = True
        log(f"{signal.Signals(signum).name}: stopping (the running train.py saves a checkpoint first)")
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)

    def check(self) -> None:
        if self.requested:
            raise Interrupted()


STOP: Stop | None = None


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -----------------------------------------------------------------------------------------
# settings
# -----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="report directory (markdown, PNGs, CSV, JSON)")
    p.add_argument("--work", type=Path, default=None,
                   help="runs, checkpoints, exports, caches (default: OUT/work; checkpoints of the 150M models "
                        "take ~15 GB: keep it off a directory you copy back)")
    p.add_argument("--smoke", action="store_true", help="debug presets, a few steps, CPU-sized (CI)")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--models", default="dense,cat,cat_adaptive", help="subset of dense,cat,cat_adaptive")
    p.add_argument("--data", default=None, help="prepared shard directory (default: the embedded stdlib corpus)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    t = p.add_argument_group("training budget (the same for every model)")
    t.add_argument("--steps", type=int, default=None, help="optimizer steps (default 300; --smoke 3)")
    t.add_argument("--minutes", type=float, default=None,
                   help="wall-clock cap per training run, startup and compilation included (default: none)")
    t.add_argument("--global-batch", type=int, default=None, help="sequences per step (default 16; --smoke 8)")
    t.add_argument("--micro-batch", type=int, default=None, help="sequences per forward (default 8)")
    t.add_argument("--warmup-steps", type=int, default=None, help="LR warm-up (default: steps // 10)")
    t.add_argument("--evals", type=int, default=6, help="validation points during training (default 6)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra train.py override for every model (repeatable), e.g. --set optimizer.lr=1e-3")
    t.add_argument("--no-compile", dest="compile", action="store_false", help="train without torch.compile")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-batches", type=int, default=None, help="validation batches of 8 (default 8; --smoke 1)")
    e.add_argument("--gen-batch", type=int, default=None, help="rows generated together (default 64; --smoke 2)")
    e.add_argument("--gen-len", type=int, default=None,
                   help="new tokens per row (default: block_size - 8, i.e. 2040; --smoke 16)")
    e.add_argument("--no-speed-compile", dest="speed_compile", action="store_false",
                   help="measure generation without torch.compile / CUDA graphs")
    a = p.parse_args(argv)
    a.phases = [x for x in a.phases.split(",") if x]
    bad = [x for x in a.phases if x not in PHASES]
    if bad:
        p.error(f"--phases: unknown {bad}; choose from {list(PHASES)}")
    pool = SMOKE_MODELS if a.smoke else GPU_MODELS
    names = [x for x in a.models.split(",") if x]
    unknown = [n for n in names if n not in {m.name for m in pool}]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from dense, cat, cat_adaptive")
    a.model_specs = [m for m in pool if m.name in names]
    import torch

    a.device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available; use --device cpu")
    # Defaults only where an option is left out: `or` turned an explicit 0 (e.g. --steps 0) into
    # the default instead of refusing it.
    def default(value, smoke, full):
        return value if value is not None else (smoke if a.smoke else full)

    a.steps = default(a.steps, 3, 300)
    a.global_batch = default(a.global_batch, 8, 16)
    a.micro_batch = default(a.micro_batch, 8, 8)
    a.warmup_steps = a.warmup_steps if a.warmup_steps is not None else max(1, a.steps // 10)
    a.eval_batches = default(a.eval_batches, 1, 8)
    a.gen_batch = default(a.gen_batch, 2, 64)
    a.work = a.work or a.out / "work"
    positive = ("steps", "evals", "global_batch", "micro_batch", "eval_batches", "gen_batch", "gen_len")
    bad = [f"--{k.replace('_', '-')} {v}" for k in positive if (v := getattr(a, k)) is not None and v < 1]
    bad += [f"--warmup-steps {a.warmup_steps}"] if a.warmup_steps < 0 else []
    bad += [f"--minutes {a.minutes}"] if a.minutes is not None and a.minutes <= 0 else []
    if bad:
        p.error(f"{', '.join(bad)}: counts must be >= 1 (--warmup-steps >= 0, --minutes > 0; leave an option out "
                f"for its default)")
    if a.global_batch % a.micro_batch:
        p.error(f"--global-batch {a.global_batch} is not a multiple of --micro-batch {a.micro_batch}")
    return a


def train_overrides(a, data_dir: Path, run_dir: Path) -> list[str]:
    """What makes the runs comparable: same data, seed, batch, schedule, steps and eval points."""
    interval = max(1, a.steps // a.evals)
    o = [f"job.run_dir={run_dir}", f"data.path={data_dir}", f"training.steps={a.steps}", "training.seed=0",
         f"training.global_batch={a.global_batch}", f"training.micro_batch={a.micro_batch}",
         f"training.eval_interval={interval}", f"training.eval_batches={a.eval_batches}", "training.sample_tokens=0",
         f"schedule.warmup_steps={a.warmup_steps}", "checkpoint.save_final=true",
         "checkpoint.async_save=false", f"metrics.log_interval={max(1, min(10, interval))}", "metrics.progress=off",
         f"checkpoint.interval={0 if a.smoke else max(1, a.steps // 3)}", "checkpoint.keep=1",
         f"job.device={a.device}", f"training.compile={'true' if a.compile and a.device == 'cuda' else 'false'}"]
    if a.device == "cpu":
        o.append("data.num_workers=0")
    return o + list(a.overrides)


# -----------------------------------------------------------------------------------------
# phases
# -----------------------------------------------------------------------------------------
def prepare_data(a) -> Path:
    if a.data:
        path = Path(a.data)
        if not (path / "manifest.json").is_file():
            raise SystemExit(f"--data {path}: not a prepared shard directory (no manifest.json); "
                             f"prepare it with tools/prepare_data.py")
        return path.resolve()
    from cat_titan.data.corpus import ensure_corpus

    t0 = time.time()
    path = Path(ensure_corpus("stdlib", "byte")).resolve()
    log(f"data: embedded stdlib corpus, byte tokenizer: {path} ({time.time() - t0:.1f}s)")
    return path


def _stream(proc: subprocess.Popen, prefix: str, logfile: Path) -> threading.Thread:
    def pump():
        with open(logfile, "a") as f:
            for line in proc.stdout:
                f.write(line)
                f.flush()
                text = line.rstrip()
                if text.startswith(("step", "eval", "error", "training", "[checkpoint]", "[preemption]", "Traceback",
                                    "nothing to do")) or "Error" in text:
                    print(f"  [{prefix}] {text}", flush=True)

    th = threading.Thread(target=pump, daemon=True)
    th.start()
    return th


def train_one(a, spec: ModelSpec, data_dir: Path, state: dict) -> dict:
    run_dir = (a.work / "runs" / spec.name).resolve()
    marker = run_dir / "study_done.json"
    overrides = train_overrides(a, data_dir, run_dir)
    settings = {"config": spec.config, "overrides": overrides, "minutes": a.minutes}
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("settings") == settings:
            log(f"train {spec.name}: done before (step {done['step']}), skipped")
            return done
        raise SystemExit(f"{run_dir} holds a run with other settings ({marker}); use another --work directory or "
                         f"delete {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / spec.config), *overrides]
    log(f"train {spec.name}: {' '.join(shlex.quote(c) for c in cmd)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    if STOP is not None:
        STOP.child = proc
    pump = _stream(proc, spec.name, run_dir / "study_train.log")
    capped = False
    try:
        rc = proc.wait(timeout=a.minutes * 60 if a.minutes else None)
    except subprocess.TimeoutExpired:
        capped = True
        log(f"train {spec.name}: --minutes {a.minutes} reached: SIGTERM (train.py saves a checkpoint and stops)")
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait()
    pump.join(timeout=10)
    seconds = time.time() - t0
    if STOP is not None:
        STOP.child = None
        if STOP.requested:  # its checkpoint is the next invocation's starting point
            raise Interrupted()
    if rc not in (0, EXIT_PREEMPTED):
        raise SystemExit(f"train {spec.name} failed with exit status {rc}; see {run_dir / 'study_train.log'}")
    from cat_titan.export import resolve_checkpoint
    from cat_titan.train.checkpoint import read_meta

    meta = read_meta(resolve_checkpoint(run_dir))
    done = {"name": spec.name, "run_dir": str(run_dir), "exit": rc, "capped": capped, "step": meta["step"],
            "tokens_seen": meta.get("tokens_seen"), "seconds": seconds, "settings": settings, "command": cmd}
    marker.write_text(json.dumps(done, indent=2))
    log(f"train {spec.name}: step {meta['step']} in {seconds:.0f}s" + (" (time cap)" if capped else ""))
    return done


def export_one(a, spec: ModelSpec, trained: dict) -> Path:
    from cat_titan.export import export, read_exported_metadata

    out = (a.work / "exports" / f"{spec.name}.safetensors").resolve()
    if out.is_file() and read_exported_metadata(out).get("step") == str(trained["step"]):
        log(f"export {spec.name}: {out} is current, skipped")
        return out
    t0 = time.time()
    info = export(trained["run_dir"], out, dtype="bf16" if a.device == "cuda" else "fp32")
    log(f"export {spec.name}: step {info['step']}, {info['parameters'] / 1e6:.1f}M parameters -> {out} "
        f"({time.time() - t0:.1f}s)")
    return out


def eval_one(a, spec: ModelSpec, path: Path, data_dir: Path) -> list[dict]:
    """Rows of one model, one per chunk size; each row is cached as soon as it is measured, so
    a study stopped by a time limit does not redo the chunk sizes it has."""
    import dataclasses

    import torch

    from cat_titan.infer.bench import SpeedConfig
    from cat_titan.infer.evaluate import (EvalConfig, eval_chunk_sizes, eval_seq_len, evaluate_model, load_batches,
                                          resolve_data_dir)
    from cat_titan.infer.pretrained import load_model

    device = torch.device(a.device)
    pre = load_model(path, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    gen_len = min(a.gen_len or 10**9, pre.model.args.block_size - 8) if not a.smoke else (a.gen_len or 16)
    compile_ = a.speed_compile and device.type == "cuda"
    speed = SpeedConfig(batch=a.gen_batch, prompt_len=8, gen_len=gen_len, compile=compile_, cuda_graphs=compile_)
    ecfg = EvalConfig(data=str(data_dir), batch_size=8, max_batches=a.eval_batches)
    key = {"path": str(path), "step": pre.step, "eval": ecfg.__dict__, "speed": speed.__dict__, "device": a.device}
    cache = a.work / "eval" / f"{spec.name}.json"
    rows: dict[str, dict] = {}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == key:
            rows = {str(r.get("chunk_size")): r for r in cached["rows"]}
    sizes = eval_chunk_sizes(pre, ecfg)
    todo = [c for c in sizes if str(c if c is not None else _fixed_chunk(pre)) not in rows]
    if not todo:
        log(f"eval {spec.name}: cached, skipped")
        return [rows[k] for k in sorted(rows, key=_size_order)]
    role = "baseline" if spec.name == "dense" else "model"
    batches = load_batches(pre, ecfg, resolve_data_dir(pre, ecfg.data), eval_seq_len(pre, ecfg))
    for c in todo:
        t0 = time.time()
        (r,) = evaluate_model(pre, dataclasses.replace(ecfg, chunk_sizes=[c] if c is not None else None), speed,
                              label=spec.name, role=role, batches=batches)
        r["description"], r["seconds"] = spec.description, time.time() - t0
        rows[str(r.get("chunk_size"))] = r
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"key": key, "rows": [rows[k] for k in sorted(rows, key=_size_order)]},
                                    indent=2, default=str))
        size = f" C={r['chunk_size']}" if r.get("chunk_size") else ""
        log(f"eval {spec.name}{size}: val loss {r['val_loss']:.4f}, {r['tokens_per_s']:,.0f} tokens/s, "
            f"{r['ms_per_step']:.2f} ms/step, peak {r['peak_mem_gib']:.2f} GiB (warm-up {r['warmup_s']:.0f}s, "
            f"{r['seconds']:.0f}s in all)")
        if STOP is not None:
            STOP.check()  # a time limit is near: the chunk sizes left are measured next time
    del pre
    if device.type == "cuda":
        torch._dynamo.reset()  # drop this model's compiled graphs and CUDA graph pools
        torch.cuda.empty_cache()
    return [rows[k] for k in sorted(rows, key=_size_order)]


def _fixed_chunk(pre):
    return pre.model.args.chunk_size if pre.kind == "cat" else None


def _size_order(key: str) -> int:
    return int(key) if key.isdigit() else 0


# -----------------------------------------------------------------------------------------
# report
# -----------------------------------------------------------------------------------------
def _final_val(rows: list[dict]) -> dict:
    evals = [r for r in rows if r.get("eval")]
    return evals[-1] if evals else {}


def write_report(a, state: dict) -> Path:
    import torch

    from cat_titan.infer.evaluate import markdown_table, write_table
    from cat_titan.infer.plots import matplotlib_available, plot_loss_curves, plot_quality_vs_cost, read_metrics

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for spec in a.model_specs for r in state["eval"].get(spec.name, [])]
    trained = state["train"]
    figures = []
    for name, t in trained.items():  # metrics rows travel in results.json (redraw without the work dir)
        rows_m = read_metrics(Path(t["run_dir"]))
        if rows_m:
            state.setdefault("metrics", {})[name] = rows_m
    if matplotlib_available():
        runs = {s.name: state.get("metrics", {}).get(s.name, []) for s in a.model_specs if s.name in trained}
        if runs:
            plot_loss_curves(runs, out / "study_loss_curves.png", title="validation loss during training (same tokens)")
            figures.append("study_loss_curves.png")
        if rows:
            plot_quality_vs_cost(rows, out / "study_quality_vs_cost.png",
                                 title="validation loss vs generation throughput and memory, per chunk size")
            figures.append("study_quality_vs_cost.png")
    if rows:
        write_table(rows, out, stem="eval")
    if "train" in a.phases or "eval" in a.phases or "device_name" not in state:
        state["device_name"] = torch.cuda.get_device_name() if a.device == "cuda" else "CPU"
        state["torch"] = torch.__version__
    device = state["device_name"]
    command = state.get("argv_run", state["argv"])
    speed_mode = "eager"
    if rows:
        speed_mode = ("torch.compile + CUDA graphs" if rows[0].get("cuda_graphs") else
                      "torch.compile" if rows[0].get("compile") else "eager")
    lines = ["# Study: dense vs CAT vs adaptive CAT on the same tokens", "",
             f"Generated by `python tools/study.py {' '.join(shlex.quote(x) for x in command)}` "
             f"on {time.strftime('%Y-%m-%d')} ({device}, torch {state['torch']}"
             + (", smoke run: debug presets, numbers mean nothing" if a.smoke else "") + ").", "",
             "## Setup", "",
             f"Same data (`{state.get('data', '?')}`), seed 0, {a.global_batch} sequences per step "
             f"(micro-batch {a.micro_batch}), the config's sequence length, optimizer and cosine schedule "
             f"(warm-up {a.warmup_steps} steps), {a.steps} steps"
             + (f", at most {a.minutes} minutes per run" if a.minutes else "") + ". Overrides passed to every run: "
             f"`{' '.join(state.get('overrides_example', []))}`.", "",
             "| model | config | description | steps | tokens seen | wall time (s) | final val loss (trainer) |",
             "| --- | --- | --- | ---: | ---: | ---: | --- |"]
    for spec in a.model_specs:
        t = trained.get(spec.name)
        if not t:
            lines.append(f"| {spec.name} | `{spec.config}` | {spec.description} | not trained | | | |")
            continue
        fv = _final_val(state.get("metrics", {}).get(spec.name, []))
        vals = ", ".join(f"{k.replace('val_loss_chunk', 'C=').replace('val_loss', '')}{' ' if 'chunk' in k else ''}"
                         f"{v:.4f}" for k, v in fv.items() if k.startswith("val_loss"))
        capped = " (time cap)" if t.get("capped") else ""
        tokens = t.get("tokens_seen")
        lines.append(f"| {spec.name} | `{spec.config}` | {spec.description} | {t['step']}{capped} | "
                     f"{tokens:,} | {t['seconds']:.0f} | {vals} |" if isinstance(tokens, int) else
                     f"| {spec.name} | `{spec.config}` | {spec.description} | {t['step']}{capped} | ? | "
                     f"{t['seconds']:.0f} | {vals} |")
    if "study_loss_curves.png" in figures:
        lines += ["", "![validation and training loss](study_loss_curves.png)", ""]
    if rows:
        speed = rows[0]
        lines += ["## Quality and cost per chunk size", "",
                  f"Validation loss: mean token cross-entropy (nats) over {a.eval_batches} batches of 8 validation "
                  f"windows; generation: greedy, batch {speed.get('gen_batch')}, prompt {speed.get('prompt_len')} "
                  f"tokens, {speed.get('gen_len')} new tokens, {speed.get('dtype')}, "
                  f"{speed_mode}; "
                  + ("peak memory is torch.cuda.max_memory_allocated while generating (weights, caches, activations)."
                     if str(speed.get("peak_mem_kind", "")).startswith("cuda") else
                     "peak memory is the process's peak RSS (an upper bound shared by all rows on CPU); "
                     "weights + caches is exact."), "",
                  markdown_table(rows), ""]
        if "study_quality_vs_cost.png" in figures:
            lines += ["![quality vs speed and memory](study_quality_vs_cost.png)", "",
                      "Each point is one chunk size; the adaptive CAT's points are one model at inference-time "
                      "settings, the fixed CAT one point, the dense model the star.", ""]
    if not matplotlib_available():
        lines += ["(No figures: matplotlib is not installed here; `python tools/study.py --out OUT --work WORK "
                  "--phases report` on a machine with it redraws them from the work directory.)", ""]
    lines += ["## Timings", "", "| phase | seconds |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.0f} |" for k, v in state["timings"].items()]
    (out / "study.md").write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({k: v for k, v in state.items() if k != "argv"}, indent=2,
                                                 default=str))
    return out / "study.md"


def load_state(a) -> dict:
    state = {"train": {}, "exports": {}, "eval": {}, "timings": {}}
    saved = a.out / "results.json"
    if saved.is_file():  # what an earlier invocation reported (the work directory may be gone)
        old = json.loads(saved.read_text())
        for k in ("train", "eval", "metrics", "data", "overrides_example", "device_name", "torch", "argv_run"):
            if k in old:
                state[k] = old[k]
    for spec in a.model_specs:
        marker = a.work / "runs" / spec.name / "study_done.json"
        if marker.is_file():
            state["train"][spec.name] = json.loads(marker.read_text())
        cache = a.work / "eval" / f"{spec.name}.json"
        if cache.is_file():
            state["eval"][spec.name] = json.loads(cache.read_text())["rows"]
    # Models trained by separate invocations (e.g. one per GPU, each with its own --out) share
    # one work directory: a report drawn from it recovers their common settings and times here.
    for name, done in state["train"].items():
        state["timings"].setdefault(f"train {name}", done["seconds"])
        overrides = [o for o in done["settings"]["overrides"] if not o.startswith("job.run_dir=")]
        if not state.get("overrides_example"):
            state["overrides_example"] = overrides
        if not state.get("data"):
            state["data"] = next((o.split("=", 1)[1] for o in overrides if o.startswith("data.path=")), None)
    for name, rows in state["eval"].items():
        state["timings"].setdefault(f"eval {name}", sum(r.get("seconds", 0.0) for r in rows))
    return state


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    state = load_state(a)
    state["argv"] = argv
    if "train" in a.phases or "eval" in a.phases:
        state["argv_run"] = argv  # the command that produced the numbers (a report-only call keeps it)
    t_all = time.time()
    state["timings"].pop("this invocation", None)  # set below; the phases keep their earlier times
    global STOP
    STOP = Stop()
    try:
        run_phases(a, state, t_all)
    except Interrupted:
        state["timings"]["this invocation"] = time.time() - t_all
        report = write_report(a, state)
        log(f"interrupted; partial report: {report}. Run the same command again to continue.")
        return EXIT_PREEMPTED
    return 0


def run_phases(a, state: dict, t_all: float) -> None:

    def timed(name, fn):
        t0 = time.time()
        result = fn()
        state["timings"][name] = state["timings"].get(name, 0.0) + time.time() - t0
        return result

    need_data = any(p in a.phases for p in ("train", "eval"))
    data_dir = timed("data", lambda: prepare_data(a)) if need_data else None
    state["data"] = str(data_dir) if data_dir else state.get("data")
    if data_dir:
        state["overrides_example"] = [o for o in train_overrides(a, data_dir, Path("RUN")) if "run_dir" not in o]
    if "train" in a.phases:
        for spec in a.model_specs:
            STOP.check()
            state["train"][spec.name] = timed(f"train {spec.name}", lambda: train_one(a, spec, data_dir, state))
            write_report(a, state)
    if "export" in a.phases or "eval" in a.phases:
        for spec in a.model_specs:
            if spec.name not in state["train"]:
                raise SystemExit(f"{spec.name} is not trained in {a.work}; run the train phase first")
            state["exports"][spec.name] = str(timed(f"export {spec.name}",
                                                    lambda: export_one(a, spec, state["train"][spec.name])))
    if "eval" in a.phases:
        for spec in a.model_specs:
            STOP.check()
            state["eval"][spec.name] = timed(f"eval {spec.name}",
                                             lambda: eval_one(a, spec, Path(state["exports"][spec.name]), data_dir))
            write_report(a, state)
    state["timings"]["this invocation"] = time.time() - t_all
    report = write_report(a, state)
    log(f"report: {report} ({state['timings']['this invocation']:.0f}s)")


if __name__ == "__main__":
    sys.exit(main())
