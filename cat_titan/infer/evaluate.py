"""Quality next to cost: validation loss, and generation speed and memory, per chunk size.

    from cat_titan.infer.evaluate import EvalConfig, evaluate_model
    from cat_titan.infer.pretrained import load_model
    rows = evaluate_model(load_model(path, "cuda", torch.bfloat16), EvalConfig(), SpeedConfig(compile=True))

One row per chunk size an adaptive CAT is evaluated at (its training curriculum's sizes by
default), one row for a fixed CAT or a dense model. The loss is the trainer's: the mean over
``max_batches`` validation batches of the model's mean next-token cross-entropy, on windows
0, 1, 2, ... of the split (``cat_titan.data.loader.validation_batches``), so the numbers
match the ``val_loss`` rows of a run's metrics.jsonl for the same data, seq_len and batches.
Data: ``EvalConfig.data``, else what the model was trained on (the run's ``data.path``, or
its embedded corpus prepared with the model's tokenizer by ``ensure_corpus``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..data.shards import DataError
from .bench import SpeedConfig, measure_generation, model_device, param_bytes
from .pretrained import Pretrained, trained_chunk_sizes

# Columns of the CSV table, in order (rows may hold more keys; the JSON keeps everything).
COLUMNS = ["model", "role", "kind", "chunk_size", "step", "params_m", "val_loss", "val_ppl", "val_bits_per_token",
           "val_loss_chunk_start", "val_loss_in_chunk",
           "eval_tokens", "seq_len", "tokens_per_s", "ms_per_step", "peak_mem_gib", "state_mem_gib", "cache_mib",
           "cache_columns", "gen_batch", "gen_len", "compile", "cuda_graphs", "device", "dtype", "path"]


@dataclass
class EvalConfig:
    data: Optional[str] = None
    """Prepared shard directory (tools/prepare_data.py); None: the data the model was trained on."""
    split: str = "val"
    """Split to evaluate on."""
    seq_len: Optional[int] = None
    """Window length; None: the run's data.seq_len (at most the model's block_size)."""
    batch_size: int = 8
    """Windows per batch."""
    max_batches: Optional[int] = 8
    """Batches evaluated (None: the whole split)."""
    chunk_sizes: Optional[list[int]] = None
    """Adaptive CATs: sizes to evaluate (None: the training curriculum's)."""


def resolve_data_dir(pre: Pretrained, data: Optional[str]) -> Path:
    """The shard directory to evaluate ``pre`` on (see the module docstring)."""
    if data:
        path = Path(data)
        if not path.is_dir():
            raise DataError(f"--data {path}: no such directory; pass a directory prepared by tools/prepare_data.py")
        return path
    d = pre.section("data")
    if d.get("path"):
        path = Path(d["path"])
        if path.is_dir():
            return path
        raise DataError(f"{pre.path} was trained on data.path={path}, which is not on this machine; pass the "
                        f"prepared directory with --data DIR")
    spec = pre.tokenizer_spec or d.get("tokenizer")
    if not spec:
        raise DataError(f"{pre.path} records neither its data nor its tokenizer; pass --data DIR")
    from ..data.corpus import ensure_corpus

    return Path(ensure_corpus(d.get("corpus") or "stdlib", spec, max_bytes=d.get("corpus_max_bytes")))


def eval_seq_len(pre: Pretrained, cfg: EvalConfig) -> int:
    seq = cfg.seq_len or pre.section("data").get("seq_len") or pre.model.args.block_size
    return min(int(seq), pre.model.args.block_size)


def load_batches(pre: Pretrained, cfg: EvalConfig, data_dir: Path, seq_len: int):
    from ..data.loader import validation_batches
    from ..data.shards import ShardedTokens

    data = ShardedTokens(data_dir, cfg.split)
    info = pre.tokenizer_info
    data.check_tokenizer(info if info.get("sha256") else pre.model.args.vocab_size)
    return validation_batches(data, seq_len, cfg.batch_size, cfg.max_batches)


@torch.no_grad()
def validation_loss(model, batches, chunk_size: Optional[int] = None) -> float:
    """Mean over batches of the model's mean token loss (as the trainer's evaluation)."""
    device = model_device(model)
    total = torch.zeros((), device=device, dtype=torch.float64)
    for x, y in batches:
        total += model(x.to(device), y.to(device), chunk_size=chunk_size).double()
    return float(total / len(batches))


@torch.no_grad()
def chunk_start_losses(model, batches, chunk_size: int) -> tuple[float, float]:
    """Mean loss of the predictions of each chunk's first token, and of all the others.

    A CAT predicts the first token of chunk k+1 from the slot that opens it (fx_{k+1}, or
    sep_{k+1}): from compressed chunks alone, no raw token. Every other token is predicted
    with the raw tokens of its own chunk in view. The gap between the two says how much the
    compressor still loses; the share of chunk starts (1/C) is why, early in training,
    smaller chunk sizes have higher mean loss. Targets at positions p with p % C == 0 (p >= 1).
    """
    device = model_device(model)
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x, chunk_size=chunk_size).float()  # (B, L, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
        start = (torch.arange(1, y.shape[1] + 1, device=device) % chunk_size) == 0  # target index t+1 opens a chunk
        for i, sel in enumerate((start, ~start)):
            sums[i] += loss[:, sel].double().sum()
            counts[i] += loss[:, sel].numel()
    first, rest = (sums / counts).tolist()
    return first, rest


def eval_chunk_sizes(pre: Pretrained, cfg: EvalConfig) -> list[Optional[int]]:
    if pre.kind != "cat_adaptive":
        return [None]
    if cfg.chunk_sizes:
        valid = list(pre.model.args.chunk_sizes)
        bad = [c for c in cfg.chunk_sizes if c not in valid]
        if bad:
            raise ValueError(f"chunk sizes {bad} are not valid for {pre.label} (cat_adaptive); valid: {valid}")
        return list(cfg.chunk_sizes)
    return trained_chunk_sizes(pre)


def evaluate_model(pre: Pretrained, cfg: EvalConfig, speed: Optional[SpeedConfig] = None, *,
                   label: Optional[str] = None, role: str = "model", batches=None, log=None) -> list[dict]:
    """Rows (one per chunk size) of validation loss and, with ``speed``, generation speed and memory."""
    model, args = pre.model, pre.model.args
    seq_len = eval_seq_len(pre, cfg)
    if batches is None:
        batches = load_batches(pre, cfg, resolve_data_dir(pre, cfg.data), seq_len)
    device = model_device(model)
    rows = []
    for c in eval_chunk_sizes(pre, cfg):
        loss = validation_loss(model, batches, c)
        row = dict(model=label or pre.label, role=role, kind=args.kind,
                   chunk_size=c if c is not None else (args.chunk_size if args.kind == "cat" else None),
                   step=pre.step, params_m=sum(p.numel() for p in model.parameters()) / 1e6, val_loss=loss,
                   val_ppl=math.exp(min(loss, 700)), val_bits_per_token=loss / math.log(2),
                   eval_tokens=sum(x.numel() for x, _ in batches), seq_len=seq_len, device=device.type,
                   dtype=str(next(model.parameters()).dtype).removeprefix("torch."), path=str(pre.path))
        if args.kind in ("cat", "cat_adaptive"):
            row["val_loss_chunk_start"], row["val_loss_in_chunk"] = chunk_start_losses(model, batches,
                                                                                       row["chunk_size"])
        if speed is not None:
            cfg_c = SpeedConfig(**{**speed.__dict__, "gen_len": min(speed.gen_len,
                                                                    args.block_size - speed.prompt_len)})
            m = measure_generation(model, cfg_c, c)
            row.update(tokens_per_s=m["tokens_per_s"], ms_per_step=m["ms_per_step"], peak_mem_gib=m["peak_mem_gib"],
                       peak_mem_kind=m["peak_mem_kind"], state_mem_gib=m["state_mem_gib"], cache_mib=m["cache_mib"],
                       cache_columns=m["cache_columns"], gen_batch=m["batch"], gen_len=m["gen_len"],
                       prompt_len=m["prompt_len"], compile=m["compile"], cuda_graphs=m["cuda_graphs"],
                       warmup_s=m["warmup_s"], recompiles_while_timed=m["recompiles_while_timed"])
        else:
            row.update(state_mem_gib=param_bytes(model) / 2**30)
        if log:
            log(row)
        rows.append(row)
    return rows


def write_table(rows: list[dict], out_dir: Path, stem: str = "eval") -> tuple[Path, Path]:
    """``{stem}.csv`` (COLUMNS) and ``{stem}.json`` (every key) in ``out_dir``."""
    import csv
    import json

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
    # a diverged model's inf/nan loss becomes null: json.dumps would write NaN, which is not JSON
    finite = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
    json_path.write_text(json.dumps({"rows": finite}, indent=2, default=str, allow_nan=False))
    return csv_path, json_path


def format_table(rows: list[dict]) -> str:
    cols = [("model", "{}"), ("kind", "{}"), ("chunk_size", "{}"), ("val_loss", "{:.4f}"), ("val_ppl", "{:.3f}"),
            ("tokens_per_s", "{:,.0f}"), ("ms_per_step", "{:.3f}"), ("peak_mem_gib", "{:.3f}"),
            ("state_mem_gib", "{:.3f}")]
    cells = [[c for c, _ in cols]]
    for r in rows:
        cells.append([f.format(r[c]) if r.get(c) is not None else "-" for c, f in cols])
    w = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(v.rjust(w[i]) for i, v in enumerate(row)) for row in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The table as markdown (docs/study.md). "chunk starts / rest": a CAT's loss on the first
    token of each chunk (predicted from compressed chunks only) / on the other tokens."""
    head = ["model", "kind", "chunk size", "val loss", "val ppl", "chunk starts / rest", "tokens/s", "ms/step",
            "peak memory (GiB)", "weights + caches (GiB)"]

    def split(r: dict) -> Optional[str]:
        if r.get("val_loss_chunk_start") is None:
            return None
        return f"{r['val_loss_chunk_start']:.3f} / {r['val_loss_in_chunk']:.3f}"

    def fmt(key: str, form: str):
        return lambda r: form.format(r[key]) if r.get(key) is not None else None

    cols = [fmt("model", "{}"), fmt("kind", "{}"), fmt("chunk_size", "{}"), fmt("val_loss", "{:.4f}"),
            fmt("val_ppl", "{:.3f}"), split, fmt("tokens_per_s", "{:,.0f}"), fmt("ms_per_step", "{:.3f}"),
            fmt("peak_mem_gib", "{:.2f}"), fmt("state_mem_gib", "{:.2f}")]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join(c(r) or "-" for c in cols) + " |")
    return "\n".join(lines)
