"""Reference-format <-> native state dicts, and reference configs -> ModelArgs.

The reference implementation (rajesh-lab/cat-transformer) names and lays out weights its
own way. One declarative table maps reference names to native names (``{}`` is a layer
index) and is used in both directions; the only tensor transform is the fused qkv weight,
stored [all q | all k | all v] by the reference and grouped per KV head natively
(common.Attention says why).
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch
from torch import Tensor

from .args import ModelArgs

# (reference name, native name, which attention geometry the qkv transform uses)
_BLOCK = [
    ("layers.{}.attention.wqkv.weight", "layers.{}.attention.wqkv.weight", "qkv"),
    ("layers.{}.attention.wo.weight", "layers.{}.attention.wo.weight", None),
    ("layers.{}.attention.q_norm.weight", "layers.{}.attention.q_norm.weight", None),
    ("layers.{}.attention.k_norm.weight", "layers.{}.attention.k_norm.weight", None),
    ("layers.{}.attention_norm.weight", "layers.{}.attention_norm.weight", None),
    ("layers.{}.ffn_norm.weight", "layers.{}.ffn_norm.weight", None),
    ("layers.{}.feed_forward.fc_1.weight", "layers.{}.feed_forward.w1.weight", None),
    ("layers.{}.feed_forward.fc_2.weight", "layers.{}.feed_forward.w3.weight", None),
    ("layers.{}.feed_forward.proj.weight", "layers.{}.feed_forward.w2.weight", None),
]
_HEAD = [
    ("wte.weight", "tok_embeddings.weight", None),
    ("norm.weight", "head.norm.weight", None),
    ("output.weight", "head.output.weight", None),
]
_CAT_LAYER = [
    ("layers.{}.attention.attention.wqkv.weight", "layers.{}.attention.inner.wqkv.weight", "cat_layer_qkv"),
    ("layers.{}.attention.attention.wo.weight", "layers.{}.attention.inner.wo.weight", None),
    ("layers.{}.attention.attention.q_norm.weight", "layers.{}.attention.inner.q_norm.weight", None),
    ("layers.{}.attention.attention.k_norm.weight", "layers.{}.attention.inner.k_norm.weight", None),
    ("layers.{}.attention.compressor.weight", "layers.{}.attention.compress.weight", None),
    ("layers.{}.attention.compressor.bias", "layers.{}.attention.compress.bias", None),
    ("layers.{}.attention.dummy_fx.weight", "layers.{}.attention.cond.weight", None),
    ("layers.{}.attention.expand.weight", "layers.{}.attention.expand.weight", None),
    ("layers.{}.attention.final_proj.weight", "layers.{}.attention.final_proj.weight", None),
]
_COMPRESSOR = [("f." + r, "compressor." + n, "compressor_qkv" if t else None) for r, n, t in _BLOCK] + [
    ("f.wte.weight", "compressor.tok_embeddings.weight", None),
    ("f.pos_tokens.weight", "compressor.chunk_pos.weight", None),
    ("f.adaptive_token.weight", "compressor.size_tokens.weight", None),
    ("f.norm.weight", "compressor.norm.weight", None),
    ("f.proj_fx.weight", "compressor.proj_fx.weight", None),
]
_CAT_EXTRA = [
    ("dummy_fx.weight", "cond.weight", None),
    ("seperator.weight", "separator.weight", None),  # sic: the reference's spelling
]

NAME_TABLES = {
    "dense": _HEAD + _BLOCK,
    "cat": _HEAD + _BLOCK + _COMPRESSOR + _CAT_EXTRA,
    "cat_adaptive": _HEAD + _BLOCK + _COMPRESSOR + _CAT_EXTRA,
    "cat_layer": _HEAD + _BLOCK + _CAT_LAYER,
}


class ReferenceFormatError(ValueError):
    """A reference-format state dict that does not match the model (names or shapes)."""


def _compile(table):
    out = []
    for ref, nat, tf in table:
        out.append((re.compile("^" + re.escape(ref).replace(r"\{\}", r"(\d+)") + "$"), nat, tf))
        out.append((re.compile("^" + re.escape(nat).replace(r"\{\}", r"(\d+)") + "$"), ref, tf))
    return out


def _qkv_geometry(args: ModelArgs, which: str) -> tuple[int, int, int]:
    """(n_heads, n_kv_heads, head_dim) of the attention a qkv weight belongs to."""
    if which == "qkv":
        return args.n_heads, args.kv_heads, args.dim // args.n_heads
    if which == "compressor_qkv":
        return args.compressor_heads, args.c_kv_heads, args.compressor_dim // args.compressor_heads
    h = args.fx_dim // args.cat_layer_head_dim
    return h, h, args.cat_layer_head_dim


def qkv_to_native(w: Tensor, n_heads: int, n_kv: int, hd: int) -> Tensor:
    """[q (n_heads*hd) | k (n_kv*hd) | v (n_kv*hd)] rows -> per KV group [q_g.. | k | v]."""
    g = n_heads // n_kv
    q, k, v = w.split([n_heads * hd, n_kv * hd, n_kv * hd], dim=0)
    q = q.reshape(n_kv, g * hd, -1)
    k = k.reshape(n_kv, hd, -1)
    v = v.reshape(n_kv, hd, -1)
    return torch.cat([q, k, v], dim=1).reshape(w.shape)


def qkv_to_reference(w: Tensor, n_heads: int, n_kv: int, hd: int) -> Tensor:
    g = n_heads // n_kv
    grouped = w.reshape(n_kv, (g + 2) * hd, -1)
    q, k, v = grouped.split([g * hd, hd, hd], dim=1)
    return torch.cat([q.reshape(n_heads * hd, -1), k.reshape(n_kv * hd, -1), v.reshape(n_kv * hd, -1)], dim=0)


def _convert(sd: Mapping[str, Tensor], args: ModelArgs, to_native: bool) -> dict[str, Tensor]:
    rules = _compile(NAME_TABLES[args.kind])
    # Rules alternate (ref->native, native->ref); keep the direction asked for.
    rules = rules[0::2] if to_native else rules[1::2]
    out: dict[str, Tensor] = {}
    unknown = []
    for name, t in sd.items():
        for pat, target, tf in rules:
            m = pat.match(name)
            if m is None:
                continue
            new = target.replace("{}", m.group(1)) if m.groups() else target
            if tf is not None and t.dim() == 2:
                fn: Callable = qkv_to_native if to_native else qkv_to_reference
                t = fn(t, *_qkv_geometry(args, tf))
            out[new] = t
            break
        else:
            unknown.append(name)
    if unknown:
        raise ReferenceFormatError(f"{len(unknown)} unexpected key(s) for a {args.kind} model: {unknown[:8]}"
                                   f"{' ...' if len(unknown) > 8 else ''}")
    return out


def reference_to_native(sd: Mapping[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    """Reference-format state dict (no 'model.' prefix) -> native state dict."""
    return _convert(sd, args, to_native=True)


def native_to_reference(sd: Mapping[str, Tensor], args: ModelArgs) -> dict[str, Tensor]:
    return _convert(sd, args, to_native=False)


def check_state_dict(sd: Mapping[str, Tensor], model: torch.nn.Module) -> None:
    """Raise one error listing missing keys, unexpected keys and shape mismatches."""
    want = model.state_dict()
    missing = sorted(set(want) - set(sd))
    extra = sorted(set(sd) - set(want))
    shapes = [f"{k}: got {tuple(sd[k].shape)}, model has {tuple(want[k].shape)}"
              for k in sorted(set(sd) & set(want)) if tuple(sd[k].shape) != tuple(want[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {missing[:8]}")
    if extra:
        problems.append(f"unexpected keys ({len(extra)}): {extra[:8]}")
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes[:8]))
    if problems:
        raise ReferenceFormatError("state dict does not match the model:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------------------
# reference configs (the fixture metadata) -> ModelArgs
# ----------------------------------------------------------------------------------------
def detect_kind(configs: Mapping, keys) -> str:
    keys = set(keys)
    if "decoder" in configs:
        return "cat_adaptive" if any(k.endswith("adaptive_token.weight") for k in keys) else "cat"
    if any(".attention.attention." in k for k in keys):
        return "cat_layer"
    return "dense"


def args_from_reference(configs: Mapping, kind: str, **overrides) -> ModelArgs:
    """Build ModelArgs from the reference's config fields (see fixtures/reference/README.md)."""
    dec = configs["decoder"] if "decoder" in configs else configs["model"]

    kw = dict(kind=kind, vocab_size=dec["vocab_size"], vocab_multiple=256, block_size=dec["block_size"],
              dim=dec["dim"], n_layers=dec["n_layer"], n_heads=dec["n_head"], n_kv_heads=dec["n_local_heads"],
              intermediate_size=dec["intermediate_size"], qk_norm=bool(dec.get("use_qk_norm", False)),
              norm_eps=dec["norm_eps"], rope_base=float(dec["rope_base"]))
    if kind in ("cat", "cat_adaptive"):
        comp = configs["compressor"]
        kw.update(chunk_size=dec["chunk_size"], compressor_dim=comp["dim"], compressor_layers=comp["n_layer"],
                  compressor_heads=comp["n_head"], compressor_kv_heads=comp["n_local_heads"],
                  compressor_intermediate_size=comp["intermediate_size"])
        if comp["dim_fx"] != dec["dim"]:
            raise ReferenceFormatError(f"compressor dim_fx={comp['dim_fx']} != decoder dim={dec['dim']}")
    elif kind == "cat_layer":
        kw.update(chunk_size=dec["chunk_size"], dim_fx=dec["dim_fx"], layer_pattern=["cat"])
        if dec.get("rope_n_elem", dec["dim"] // dec["n_head"]) != dec["dim"] // dec["n_head"]:
            raise ReferenceFormatError("cat_layer with rope_n_elem != dim/n_head is not supported")
    kw.update(overrides)
    return ModelArgs(**kw)


def reference_configs(args: ModelArgs) -> dict:
    """ModelArgs -> the reference's config fields (the fixture metadata's 'configs')."""

    def one(dim, n_layer, n_head, n_kv, ffn, **extra):
        return dict(block_size=args.block_size, vocab_size=args.vocab_size, padded_vocab_size=args.padded_vocab_size,
                    n_layer=n_layer, n_head=n_head, dim=dim, intermediate_size=ffn, n_local_heads=n_kv,
                    head_dim=dim // n_head, rope_base=args.rope_base, norm_eps=args.norm_eps,
                    rope_n_elem=dim // n_head, use_fused_ops=False, use_qk_norm=args.qk_norm, **extra)

    if args.vocab_multiple != 256:
        raise ReferenceFormatError(f"the reference pads the vocabulary to 256; model.vocab_multiple="
                                   f"{args.vocab_multiple} has no reference equivalent")
    dec = one(args.dim, args.n_layers, args.n_heads, args.kv_heads, args.ffn_dim)
    if args.kind == "dense":
        return {"model": dec}
    if args.kind == "cat_layer":
        if args.layer_pattern != ["cat"] or args.cat_layer_head_dim != 64:
            raise ReferenceFormatError("only all-CAT layer stacks with 64-wide heads exist in the reference format")
        chunk = dict(chunk_size=args.chunk_size, dim_fx=args.fx_dim, num_chunks=args.block_size // args.chunk_size)
        return {"model": {**dec, **chunk}}
    chunk = dict(chunk_size=args.chunk_size, dim_fx=args.dim, num_chunks=args.block_size // args.chunk_size)
    comp = one(args.compressor_dim, args.compressor_layers, args.compressor_heads, args.c_kv_heads, args.c_ffn_dim)
    return {"decoder": {**dec, **chunk}, "compressor": {**comp, **chunk}}
