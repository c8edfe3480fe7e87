#!/usr/bin/env python
"""torchtitan's Llama3 training step, timed like tools/bench_train.py: the anchor for MFU and
dense-throughput comparisons (issue 8). torchtitan is an optional benchmark dependency only.

    torchrun --standalone --nproc_per_node=2 tools/torchtitan_anchor.py --dim 1536 --layers 12 --heads 24
    python tools/bench_train.py --config configs/dense_150m.yaml --anchor torchtitan   # same invocation

What runs is torchtitan's own code, as its trainer assembles it for a default Llama3 job:
``Transformer`` built on the meta device, ``parallelize_llama`` (op-level selective activation
checkpointing, per-block ``torch.compile``, FSDP2 over all ranks with bf16 parameters and fp32
reductions; on one rank no FSDP but bf16 autocast, as its trainer's ``maybe_enable_amp``),
``init_weights``, its loss (sum cross-entropy, divided by the tokens) and its distributed
``clip_grad_norm_``, AdamW (fused on CUDA; torchtitan's defaults lr 8e-4, weight decay 0.1).
Its trainer itself is not used: it needs a tokenizer and a dataset on disk even to time a
step, and this times random tokens as bench_train does. FLOPs per token, two ways: torchtitan's
own convention (``get_nparams_and_flops``: the MFU its logs would print; it counts the full
L x L attention scores, "not accounting for sparsity in causal attention"), and cat_titan's
formula (``registry.flops_per_token``: only the L(L+1)/2 pairs the causal mask allows, as
bench_train counts for cat_titan's models). Compare MFUs computed with the same formula.

Needs: ``pip install torchtitan==0.2.2`` and what its package imports (datasets, tokenizers,
tyro, ...). Tested on CPU with torch 2.13 (datasets 3.6, huggingface_hub < 1), one process
only: torchtitan's FSDP reduces gradients with PREMUL_SUM, which gloo does not have.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INSTALL_HINT = ("torchtitan is an optional benchmark dependency: pip install torchtitan==0.2.2 (it imports "
                "datasets, tokenizers, tyro, einops and tensorboard too)")


@dataclass
class AnchorConfig:
    dim: int = 1536
    layers: int = 12
    heads: int = 24
    kv_heads: int | None = None
    vocab: int = 32000
    seq_len: int = 2048
    local_batch: int = 8
    steps: int = 15
    warmup: int = 5
    compile: bool = True
    ac: str = "selective"  # torchtitan's default job: op-level selective AC
    seed: int = 0


def _import_torchtitan():
    try:
        from torchtitan.config import JobConfig
        from torchtitan.distributed import ParallelDims
        from torchtitan.distributed.utils import clip_grad_norm_, maybe_enable_amp
        from torchtitan.models.llama3.infra.parallelize import parallelize_llama
        from torchtitan.models.llama3.model.args import TransformerModelArgs
        from torchtitan.models.llama3.model.model import Transformer
    except ImportError as e:
        raise SystemExit(f"{INSTALL_HINT}; import failed: {e}") from e
    return JobConfig, ParallelDims, clip_grad_norm_, maybe_enable_amp, parallelize_llama, TransformerModelArgs, \
        Transformer


def _ensure_process_group(device: torch.device) -> None:
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:  # plain `python`: a group of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def run_anchor(cfg: AnchorConfig, device: torch.device) -> dict:
    """Time torchtitan's Llama3 step on all ranks of the (possibly new) default process group."""
    (JobConfig, ParallelDims, clip_grad_norm_, maybe_enable_amp, parallelize_llama, TransformerModelArgs,
     Transformer) = _import_torchtitan()
    import torchtitan

    from cat_titan.train.metrics import mfu, peak_flops, step_time_stats, time_steps

    _ensure_process_group(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    job = JobConfig()
    job.training.seq_len, job.training.local_batch_size = cfg.seq_len, cfg.local_batch
    job.training.mixed_precision_param, job.training.mixed_precision_reduce = "bfloat16", "float32"
    job.compile.enable, job.compile.components = cfg.compile, ["model", "loss"]
    job.activation_checkpoint.mode = cfg.ac
    if cfg.ac == "selective":
        job.activation_checkpoint.selective_ac_option = "op"
    job.parallelism.data_parallel_shard_degree = world
    pdims = ParallelDims(dp_replicate=1, dp_shard=world, cp=1, tp=1, pp=1, ep=1, etp=1, world_size=world)
    if device.type == "cpu":  # torchtitan assumes "cuda" where it finds no accelerator: CPU smoke runs
        import torchtitan.distributed.parallel_dims as tt_pdims

        tt_pdims.device_type = "cpu"
    pdims.build_mesh()

    args = TransformerModelArgs(dim=cfg.dim, n_layers=cfg.layers, n_heads=cfg.heads, n_kv_heads=cfg.kv_heads,
                                vocab_size=cfg.vocab, max_seq_len=cfg.seq_len)
    with torch.device("meta"):
        model = Transformer(args)
    n_params, flops_per_token = args.get_nparams_and_flops(model, cfg.seq_len)
    flops_cat_titan = cat_titan_flops(model, cfg)
    model = parallelize_llama(model, pdims, job)
    model.to_empty(device=device)
    torch.manual_seed(cfg.seed)
    with torch.no_grad():
        model.init_weights(buffer_device=device)
    model.train()
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(model.parameters(), lr=8e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=cuda or None)

    def loss_fn(pred, labels):  # torchtitan's: sum cross-entropy in fp32, normalised by the tokens
        return torch.nn.functional.cross_entropy(pred.flatten(0, 1).float(), labels.flatten(0, 1), reduction="sum")

    if cfg.compile:
        loss_fn = torch.compile(loss_fn)
    g = torch.Generator(device=device).manual_seed(cfg.seed + rank)
    # Mixed precision as torchtitan's trainer does it: FSDP's bf16 parameters on several
    # ranks; on one rank (no FSDP) bf16 autocast around forward and loss. Without it a
    # single-GPU anchor trains in fp32 (measured: 13.7k tokens/s at 1536x12 on an H200).
    amp = maybe_enable_amp(pdims, job.training.mixed_precision_param, device.type)

    def step():
        x = torch.randint(0, cfg.vocab, (cfg.local_batch, cfg.seq_len + 1), device=device, generator=g)
        inputs, labels = x[:, :-1], x[:, 1:]
        with amp:
            loss = loss_fn(model(inputs), labels) / labels.numel()
        loss.backward()
        clip_grad_norm_([p for p in model.parameters()], 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(cfg.warmup):
        loss = step()
    float(loss.detach())
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    wall, times, losses, _ = time_steps(step, cfg.steps, device)
    final = float(losses[-1].detach())
    del losses
    tps = cfg.local_batch * cfg.seq_len / (wall / cfg.steps)  # per device
    peak = peak_flops(device)
    return {
        "anchor": f"torchtitan {getattr(torchtitan, '__version__', '?')} Llama3", "dim": cfg.dim,
        "layers": cfg.layers, "heads": cfg.heads, "vocab": cfg.vocab, "seq_len": cfg.seq_len,
        "local_batch": cfg.local_batch, "world": world, "compile": cfg.compile, "ac": cfg.ac,
        "mixed_precision": ("FSDP bf16 parameters" if pdims.fsdp_enabled
                            else "bf16 autocast" if isinstance(amp, torch.autocast) else "none"),
        "params": n_params, "flops_per_token": flops_per_token, "tokens_per_sec_per_device": tps,
        "mfu": mfu(tps, flops_per_token, peak), "flops_per_token_cat_titan": flops_cat_titan,
        "mfu_cat_titan_flops": mfu(tps, flops_cat_titan, peak),
        **step_time_stats(wall, times, cfg.steps),
        "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None, "final_loss": final,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu", "torch": torch.__version__,
    }


def cat_titan_flops(model: torch.nn.Module, cfg: AnchorConfig) -> float:
    """cat_titan's FLOPs per token (registry.flops_per_token) for torchtitan's Llama3 of this
    shape: the same formula bench_train applies to cat_titan's models."""
    from cat_titan.models.args import ModelArgs
    from cat_titan.models.registry import flops_per_token

    hidden = next(m for name, m in model.named_modules() if name.endswith("feed_forward")).w1.out_features
    args = ModelArgs(kind="dense", vocab_size=cfg.vocab, vocab_multiple=1, block_size=cfg.seq_len, dim=cfg.dim,
                     n_layers=cfg.layers, n_heads=cfg.heads, n_kv_heads=cfg.kv_heads, intermediate_size=hidden)
    return flops_per_token(args, cfg.seq_len)


def describe(row: dict) -> str:
    from cat_titan.train.metrics import percent

    mem = f"{row['peak_mem_gb']:.1f} GB" if row["peak_mem_gb"] is not None else "n/a"
    return (f"{row['anchor']} {row['dim']}x{row['layers']} ({row['heads']} heads, compile {row['compile']}, "
            f"AC {row['ac']}, {row['mixed_precision']}): {row['tokens_per_sec_per_device']:,.0f} tokens/s per device, "
            f"MFU {percent(row['mfu'])} with torchtitan's FLOPs, {percent(row['mfu_cat_titan_flops'])} with "
            f"cat_titan's formula (causal pairs only), peak {mem}, step {row['step_s_mean'] * 1e3:.1f} ms "
            f"(median {row['step_s_median'] * 1e3:.1f}) on {row['world']} x {row['device_name']}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = AnchorConfig()
    p.add_argument("--dim", type=int, default=d.dim)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--vocab", type=int, default=d.vocab)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--local-batch", type=int, default=d.local_batch)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--ac", default=d.ac, choices=["selective", "full", "none"])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.dim % a.heads:
        p.error(f"--dim {a.dim} is not divisible by --heads {a.heads}")
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = AnchorConfig(dim=a.dim, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads, vocab=a.vocab,
                       seq_len=a.seq_len, local_batch=a.local_batch, steps=a.steps, warmup=a.warmup,
                       compile=a.compile, ac=a.ac)
    row = run_anchor(cfg, device)
    if dist.get_rank() == 0:
        print(describe(row), flush=True)
        if a.json:
            a.json.write_text(json.dumps(row, indent=1))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
