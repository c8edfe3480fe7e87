#!/usr/bin/env python
"""Validation loss next to generation speed and memory, per chunk size: the picture of a
CAT's test-time knob.

    python tools/evaluate.py runs/cat_adaptive/export.safetensors runs/cat/export.safetensors \\
        --baseline runs/dense/export.safetensors --out runs/eval --compile --device cuda
    # CPU, quick
    python tools/evaluate.py MODEL --max-batches 2 --gen-batch 2 --gen-len 32 --out /tmp/eval

MODEL...: exported .safetensors files, checkpoint directories or run directories
(``cat_titan.load_pretrained``), compared side by side and labelled by file stem or run name
(where those are equal, by the shortest path suffixes that differ; --labels overrides).
--baseline PATH adds a reference model (e.g. the dense Transformer) drawn as a star. An
adaptive CAT is evaluated at every chunk size of its training curriculum (--chunk-sizes
overrides), a fixed CAT and a dense model once.

Loss: mean next-token cross-entropy on --max-batches batches of --batch-size windows of the
validation split (windows 0, 1, 2, ...: what the trainer's val_loss uses), of --data DIR or,
by default, the data the model was trained on (its data.path, or the embedded corpus prepared
with its tokenizer). seq_len defaults to the run's. Speed: greedy generation of --gen-len
tokens for --gen-batch random prompts of --prompt-len tokens (cat_titan.infer.bench; --gen-len
is capped at block_size - prompt-len), tokens/s and peak memory (CUDA max allocated; on CPU
the plot uses weights + KV caches instead). --no-speed skips it.

Writes OUT/eval.csv, OUT/eval.json (every field) and OUT/eval.png (val loss vs tokens/s and
vs memory, one labelled point per chunk size). Exit status 2 on a bad model, data or option.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cat_titan.data.shards import DataError  # noqa: E402
from cat_titan.data.tokenizer import TokenizerError  # noqa: E402
from cat_titan.export import ExportError  # noqa: E402
from cat_titan.infer.bench import SpeedConfig  # noqa: E402
from cat_titan.infer.evaluate import EvalConfig, evaluate_model, format_table, write_table  # noqa: E402
from cat_titan.infer.pretrained import DTYPES, distinct_labels, load_model, resolve_dtype  # noqa: E402
from cat_titan.models.base import ModelInputError  # noqa: E402

EXIT_USAGE = 2


def _sizes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="exported file, checkpoint or run directory")
    p.add_argument("--baseline", action="append", default=[], metavar="PATH",
                   help="reference model(s) drawn as a star (e.g. the dense baseline)")
    p.add_argument("--labels", type=lambda s: s.split(","), default=None,
                   help="comma-separated names for MODEL... (default: file stems / run names, or the "
                        "shortest path suffixes that tell equal ones apart)")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="output directory (runs/eval)")
    g = p.add_argument_group("loss")
    g.add_argument("--data", help="prepared shard directory (default: the model's training data)")
    g.add_argument("--split", default="val")
    g.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's data.seq_len)")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--max-batches", type=int, default=8, help="batches evaluated (0: the whole split)")
    g.add_argument("--chunk-sizes", type=_sizes, default=None, help="adaptive CATs: e.g. 4,8,16,32")
    s = p.add_argument_group("generation speed")
    s.add_argument("--no-speed", dest="speed", action="store_false", help="skip the generation benchmark")
    s.add_argument("--gen-batch", type=int, default=64)
    s.add_argument("--prompt-len", type=int, default=8)
    s.add_argument("--gen-len", type=int, default=2048)
    s.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    s.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                   help="with --compile on CUDA: without CUDA graphs")
    s.add_argument("--repeat", type=int, default=1)
    s.add_argument("--attend-bucket", type=int, default=None, metavar="N",
                   help="dense layers attend over the filled cache prefix rounded up to N columns")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "stored", *DTYPES],
                   help="auto: bf16 on CUDA, fp32 elsewhere")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return run(a)
    except (ExportError, DataError, TokenizerError, ModelInputError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


def run(a) -> int:
    if a.labels is not None and len(a.labels) != len(a.models):
        raise ValueError(f"--labels has {len(a.labels)} names for {len(a.models)} models")
    # Checked before any model loads; --max-batches -1 evaluated no batch and wrote NaN losses,
    # --seq-len 0 silently used the run's.
    bad = [f"--{name} {v} (must be >= {low})" for name, v, low in
           (("batch-size", a.batch_size, 1), ("max-batches", a.max_batches, 0), ("seq-len", a.seq_len, 1))
           if v is not None and v < low]
    if bad:
        raise ValueError(f"bad options: {'; '.join(bad)}; --max-batches 0 evaluates the whole split, leaving "
                         f"out --seq-len uses the run's")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but CUDA is not available; use --device cpu")
    ecfg = EvalConfig(data=a.data, split=a.split, seq_len=a.seq_len, batch_size=a.batch_size,
                      max_batches=a.max_batches or None, chunk_sizes=a.chunk_sizes)
    speed = None
    if a.speed:
        speed = SpeedConfig(batch=a.gen_batch, prompt_len=a.prompt_len, gen_len=a.gen_len, compile=a.compile,
                            cuda_graphs=a.compile and a.cuda_graphs and device.type == "cuda", repeat=a.repeat,
                            attend_bucket=a.attend_bucket)
        speed.validate()
    dtype = resolve_dtype(a.dtype, device)
    # Distinct over models and baselines together: several exports all named model.safetensors
    # were one label, "model", for every row.
    labels = distinct_labels(a.models + a.baseline)
    if a.labels is not None:
        labels[:len(a.models)] = a.labels
    jobs = [(path, label, "model" if i < len(a.models) else "baseline")
            for i, (path, label) in enumerate(zip(a.models + a.baseline, labels))]
    rows = []

    def log(r):
        speed_txt = f", {r['tokens_per_s']:,.0f} tokens/s" if r.get("tokens_per_s") else ""
        size = f" C={r['chunk_size']}" if r.get("chunk_size") else ""
        print(f"[evaluate] {r['model']}{size}: val loss {r['val_loss']:.4f}{speed_txt}", file=sys.stderr, flush=True)

    for i, (path, label, role) in enumerate(jobs):
        pre = load_model(path, device=device, dtype=dtype)
        # "input": which MODEL/--baseline a row is from; the plot joins rows by it, not by label
        rows += [{**r, "input": i} for r in evaluate_model(pre, ecfg, speed, label=label, role=role, log=log)]
        del pre
    csv_path, json_path = write_table(rows, a.out)
    print(format_table(rows))
    print(f"wrote {csv_path}, {json_path}", end="")
    if a.plot:
        from cat_titan.infer.plots import matplotlib_available, plot_quality_vs_cost

        if matplotlib_available():
            png = plot_quality_vs_cost(rows, a.out / "eval.png", title=f"validation loss vs generation cost "
                                                                      f"({device.type})")
            print(f", {png}", end="")
        else:
            print(" (no PNG: matplotlib is not installed; pip install matplotlib)", end="")
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
