"""Recompute the outputs stored in a reference-format file (see
../shared/fixtures/reference/README.md) with cat_titan, and report the differences."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .models.reference import args_from_reference, check_state_dict, detect_kind, reference_to_native
from .models.registry import build_model

TOLERANCE = 1e-4  # max abs logit difference in float32 (README of the fixtures)


@dataclass
class ParityResult:
    name: str
    max_abs_diff: float  # for greedy outputs: number of differing tokens
    ok: bool
    detail: str = ""


def load_reference_file(path: str | Path):
    """-> (kind, ModelArgs, native state dict, other tensors)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "configs" not in meta:
        raise ValueError(f"{path}: safetensors metadata has no 'configs' entry; not a reference-format file")
    configs = json.loads(meta["configs"])
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    others = {k: v for k, v in tensors.items() if not k.startswith("model.")}
    kind = detect_kind(configs, weights)
    args = args_from_reference(configs, kind)
    return kind, args, reference_to_native(weights, args), others


def greedy_full_forward(model, prompt: torch.Tensor, total_len: int, **kw) -> torch.Tensor:
    """Greedy decoding by re-running the full forward pass for every new token."""
    tokens = prompt
    while tokens.shape[1] < total_len:
        logits = model(tokens, **kw)[:, -1]
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def greedy_cached(model, prompt: torch.Tensor, total_len: int, chunk_size=None) -> torch.Tensor:
    """Greedy decoding with the KV-cache generation path (cat_titan.infer): prompt (B, P) ->
    (B, total_len). Argmax over the padded vocabulary, as the reference's greedy loop takes it."""
    from .infer import generate

    new = generate(model, prompt, total_len - prompt.shape[1], chunk_size=chunk_size,
                   vocab_size=model.args.padded_vocab_size)
    return torch.cat([prompt.cpu(), torch.tensor(new, dtype=prompt.dtype)], dim=1)


@torch.no_grad()
def run_parity(path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32,
               tolerance: float = TOLERANCE, attn_backend: str = "auto", fused_ops: str = "off") -> list[ParityResult]:
    kind, args, sd, others = load_reference_file(path)
    args = args.replace(attn_backend=attn_backend, fused_ops=fused_ops)
    model = build_model(args, device="meta", runtime_device=device)
    model.to_empty(device=device)
    check_state_dict(sd, model)
    model.load_state_dict(sd)
    model.init_buffers()
    model.to(dtype).eval()
    results = []
    for name in sorted(others):
        m = re.fullmatch(r"logits(.*)", name)
        if not m:
            continue
        suffix = m.group(1)
        chunk = re.fullmatch(r"_chunk(\d+)", suffix)
        inp = others.get("input_ids" + ("" if chunk else suffix))
        if inp is None:
            results.append(ParityResult(name, float("inf"), False, f"no input tensor for {name}"))
            continue
        kw = {"chunk_size": int(chunk.group(1))} if chunk else {}
        out = model(inp.to(device), **kw).float().cpu()
        want = others[name].float()
        if out.shape != want.shape:
            results.append(ParityResult(name, float("inf"), False, f"shape {tuple(out.shape)} != {tuple(want.shape)}"))
            continue
        diff = (out - want).abs().max().item()
        results.append(ParityResult(name, diff, diff <= tolerance))
    if "greedy_tokens" in others and "greedy_prompt" in others:
        want = others["greedy_tokens"]
        for name, decode in (("greedy_tokens[full-forward]", greedy_full_forward),
                             ("greedy_tokens[cached]", greedy_cached)):
            got = decode(model, others["greedy_prompt"].to(device), want.shape[1]).cpu()
            bad = int((got != want).sum())
            results.append(ParityResult(name, bad, bad == 0, f"{bad} tokens differ out of {want.numel()}"))
    return results
