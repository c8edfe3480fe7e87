#!/usr/bin/env python
"""GPU checks of the models (one H200, bf16), in one run:

1. reference parity in bf16 against the float32 fixtures (FlexAttention; fused ops off/on);
2. reference-sized CAT (decoder 1536x12/24 heads, compressor 768x3/12, chunk 8, seq 2048,
   batch 8): FlexAttention vs SDPA-on-dense-mask, and liger fused ops vs plain PyTorch:
   loss and per-parameter gradient agreement under bf16 autocast;
3. first forward+backward throughput of that model with and without fused ops, eager and
   with compiled blocks.

    python tools/gpu_model_checks.py --fixtures DIR [--json OUT]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cat_titan.models.registry import build_model, flops_per_token, get_preset  # noqa: E402
from cat_titan.parity import run_parity  # noqa: E402

BF16_TOL = 0.1  # max abs logit error in bf16 for logits of order 1-4 (bf16 eps = 2^-8)


def parity(fixtures: Path) -> list[dict]:
    rows = []
    for fused in ("off", "on"):
        for f in sorted(fixtures.glob("*.safetensors")):
            for r in run_parity(f, "cuda", torch.bfloat16, BF16_TOL, "flex", fused):
                rows.append(dict(file=f.name, fused=fused, output=r.name, max_abs_diff=r.max_abs_diff, ok=r.ok))
                print(f"parity bf16 fused={fused} {f.name} {r.name}: {r.max_abs_diff:.4g} {'ok' if r.ok else 'FAIL'}",
                      flush=True)
    return rows


def loss_and_grads(model, x, y, bf16=True):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        loss = model(x, y)
    loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}


def compare(name, a, b) -> dict:
    (la, ga), (lb, gb) = a, b
    rel = {n: ((ga[n] - gb[n]).norm() / ga[n].norm().clamp_min(1e-12)).item() for n in ga}
    worst = max(rel, key=rel.get)
    out = dict(check=name, loss_a=la, loss_b=lb, loss_abs_diff=abs(la - lb), worst_grad=worst,
               worst_grad_rel_err=rel[worst], median_grad_rel_err=sorted(rel.values())[len(rel) // 2])
    print(f"{name}: loss {la:.5f} vs {lb:.5f}; grad rel err median {out['median_grad_rel_err']:.2e}, "
          f"worst {rel[worst]:.2e} ({worst})", flush=True)
    return out


def timed(model, x, y, steps=10, warmup=3) -> float:
    for _ in range(warmup):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, y).backward()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            model(x, y).backward()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / steps


VARIANTS = [("sdpa", "sdpa", "off"), ("flex", "flex", "off"), ("flex_fused", "flex", "on")]


def reference_batch(a):
    """The reference-sized CAT's arguments and one seeded batch of random tokens."""
    args = get_preset("cat-150m")
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randint(0, args.vocab_size, (a.batch, a.seq), device="cuda", generator=g)
    y = torch.randint(0, args.vocab_size, (a.batch, a.seq), device="cuda", generator=g)
    return args, x, y


def fp32_equality(a) -> int:
    """Same comparisons without autocast: differences are float32 rounding only."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    args, x, y = reference_batch(a)
    res = {}
    for key, backend, fused in VARIANTS:
        m = build_model(args.replace(attn_backend=backend, fused_ops=fused), device="cuda", seed=0)
        res[key] = loss_and_grads(m, x, y, bf16=False)
        del m
    rows = [compare("fp32 flex vs sdpa", res["sdpa"], res["flex"]),
            compare("fp32 fused vs plain", res["flex"], res["flex_fused"])]
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--fixtures", type=Path, required=True)
    p.add_argument("--json", type=Path)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--fp32-equality", action="store_true",
                   help="only compare flex vs SDPA and fused vs plain in float32 (no autocast)")
    a = p.parse_args()
    if a.fp32_equality:
        return fp32_equality(a)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    report["parity"] = parity(a.fixtures)

    args, x, y = reference_batch(a)
    models = {}
    for key, backend, fused in VARIANTS:
        models[key] = build_model(args.replace(attn_backend=backend, fused_ops=fused), device="cuda", seed=0)
    res = {k: loss_and_grads(m, x, y) for k, m in models.items()}
    report["equality"] = [compare("flex vs sdpa (plain ops)", res["sdpa"], res["flex"]),
                          compare("fused vs plain (flex)", res["flex"], res["flex_fused"])]
    del res
    models.pop("sdpa")
    torch.cuda.empty_cache()

    flops = flops_per_token(args, a.seq)
    rows = []
    for key in ("flex", "flex_fused"):
        for compiled in (False, True):
            m = models[key]
            if compiled:
                for layer in list(m.layers) + list(m.compressor.layers):
                    layer.compile()
            torch.cuda.reset_peak_memory_stats()
            try:
                dt = timed(m, x, y)
            except Exception as e:  # report and go on: the other variants still count
                print(f"throughput {key} compiled={compiled}: ERROR {type(e).__name__}: {e}", flush=True)
                rows.append(dict(variant=key, compiled=compiled, error=str(e)[:500]))
                continue
            tps = a.batch * a.seq / dt
            row = dict(variant=key, compiled=compiled, step_s=dt, tokens_per_s=tps,
                       mfu=tps * flops / 989e12, peak_gb=torch.cuda.max_memory_allocated() / 1e9)
            rows.append(row)
            print(f"fwd+bwd {key:10s} compiled={compiled}: {tps / 1e3:.1f}k tok/s, MFU {row['mfu']:.1%}, "
                  f"peak {row['peak_gb']:.1f} GB", flush=True)
    report["throughput"] = rows
    report["flops_per_token"] = flops
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    bad = [r for r in report["parity"] if not r["ok"] and "greedy" not in r["output"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
