"""An independent, deliberately plain implementation of the reference CAT semantics.

It works on reference-format state dicts and configs (the fixture format) and follows the
reference's own computation order: the *interleaved* decoder sequence with the
reference's mask, a Python loop over chunks for the compressor, fused qkv split as
[q | k | v]. cat_titan's models use a permuted layout, a batched compressor and a grouped
qkv layout; agreement between the two is evidence that those transformations are exact.
Used to build fixture-format files the parity tool has never seen (other sizes, GQA,
QK-norm, chunk sizes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(x, w, eps):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rope_cs(n_elem, positions, base):
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2).float() / n_elem))
    ang = torch.outer(positions.float(), theta).repeat(1, 2)
    return ang.cos(), ang.sin()


def rot(x, cos, sin):
    n = cos.shape[-1]
    a, rest = x[..., :n], x[..., n:]
    r = torch.cat([-a[..., n // 2:], a[..., : n // 2]], -1)
    return torch.cat([a * cos + r * sin, rest], -1)


def attention(sd, p, x, cfg, cos, sin, mask, n_head=None, head_dim=None):
    B, S, _ = x.shape
    nh = n_head or cfg["n_head"]
    nkv = n_head or cfg["n_local_heads"]
    hd = head_dim or cfg["head_dim"]
    qkv = x @ sd[p + "wqkv.weight"].T
    q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], -1)
    q, k, v = q.view(B, S, nh, hd), k.view(B, S, nkv, hd), v.view(B, S, nkv, hd)
    if cfg.get("use_qk_norm"):
        q = rms(q, sd[p + "q_norm.weight"], cfg["norm_eps"])
        k = rms(k, sd[p + "k_norm.weight"], cfg["norm_eps"])
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = rot(q, cos, sin), rot(k, cos, sin)
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, S, nh * hd)
    return y @ sd[p + "wo.weight"].T


def mlp(sd, p, x):
    return (F.silu(x @ sd[p + "fc_1.weight"].T) * (x @ sd[p + "fc_2.weight"].T)) @ sd[p + "proj.weight"].T


def block(sd, p, x, cfg, cos, sin, mask):
    h = x + attention(sd, p + "attention.", rms(x, sd[p + "attention_norm.weight"], cfg["norm_eps"]), cfg, cos, sin,
                      mask)
    return h + mlp(sd, p + "feed_forward.", rms(h, sd[p + "ffn_norm.weight"], cfg["norm_eps"]))


def causal(S):
    return torch.ones(S, S, dtype=torch.bool).tril()


def interleaved_mask(S, group):
    q, kv = torch.arange(S)[:, None], torch.arange(S)[None, :]
    return (((q // group) == (kv // group)) | ((kv % group) == 0)) & (q >= kv)


def dense_forward(sd, cfg, ids):
    x = sd["wte.weight"][ids]
    cos, sin = rope_cs(cfg["head_dim"], torch.arange(ids.shape[1]), cfg["rope_base"])
    for i in range(cfg["n_layer"]):
        x = block(sd, f"layers.{i}.", x, cfg, cos, sin, causal(ids.shape[1]))
    return rms(x, sd["norm.weight"], cfg["norm_eps"]) @ sd["output.weight"].T


def compress_chunk(sd, ccfg, chunk_ids, k, adaptive, power, C_max):
    """One chunk (B, c) -> (B, dim_fx), the reference's per-chunk compressor."""
    B, c = chunk_ids.shape
    x = sd["f.wte.weight"][chunk_ids]
    pre = [sd["f.pos_tokens.weight"][k].expand(B, 1, -1)]
    if adaptive:
        pre.insert(0, sd["f.adaptive_token.weight"][power].expand(B, 1, -1))
    x = torch.cat(pre + [x], 1)
    cos, sin = rope_cs(ccfg["head_dim"], torch.arange(x.shape[1]), ccfg["rope_base"])
    for i in range(ccfg["n_layer"]):
        x = block(sd, f"f.layers.{i}.", x, ccfg, cos, sin, None)
    x = rms(x, sd["f.norm.weight"], ccfg["norm_eps"])[:, len(pre):].reshape(B, -1)
    w = sd["f.proj_fx.weight"]
    if adaptive:
        w = F.interpolate(w[None, None], size=(w.shape[0], c * ccfg["dim"]), mode="bilinear")[0, 0]
    return x @ w.T


def cat_forward(sd, configs, ids, chunk=None):
    dec, comp = configs["decoder"], configs["compressor"]
    adaptive = "f.adaptive_token.weight" in sd
    C = chunk or dec["chunk_size"]
    power = int(math.log2(C))
    B, L0 = ids.shape
    if L0 % C:
        ids = F.pad(ids, (0, C - L0 % C))
    K = ids.shape[1] // C
    chunks = ids.view(B, K, C)
    fx = torch.stack([compress_chunk(sd, comp, chunks[:, k], k, adaptive, power, dec["chunk_size"])
                      for k in range(K)], 1)
    cond = sd["dummy_fx.weight"][power if adaptive else 0].expand(B, 1, -1)
    slots = torch.cat([cond, fx], 1)  # (B, K+1, D)
    emb = sd["wte.weight"][chunks]  # (B, K, C, D)
    groups = []
    for k in range(K + 1):
        g = [slots[:, k:k + 1]]
        if adaptive:
            g.append(sd["seperator.weight"].expand(B, 1, -1))
        if k < K:
            g.append(emb[:, k])
        groups.append(torch.cat(g, 1))
    x = torch.cat(groups, 1)
    G = C + (2 if adaptive else 1)
    S = x.shape[1]
    cos, sin = rope_cs(dec["head_dim"], torch.arange(S) % G, dec["rope_base"])
    for i in range(dec["n_layer"]):
        x = block(sd, f"layers.{i}.", x, dec, cos, sin, interleaved_mask(S, G))
    x = rms(x, sd["norm.weight"], dec["norm_eps"])
    # output for input position t = kC + j: its own token unless j == C-1, then the slot
    # (fx, or the separator for adaptive) that opens chunk k+1
    lead = 2 if adaptive else 1
    idx = []
    for t in range(K * C):
        k, j = divmod(t, C)
        idx.append((k + 1) * G + (1 if adaptive else 0) if j == C - 1 else k * G + lead + j)
    return (x[:, idx] @ sd["output.weight"].T)[:, :L0]


def cat_layer_forward(sd, configs, ids):
    cfg = configs["model"]
    C, Dfx, eps = cfg["chunk_size"], cfg["dim_fx"], cfg["norm_eps"]
    B, L = ids.shape
    K = L // C
    G = C + 1
    x = sd["wte.weight"][ids]
    for i in range(cfg["n_layer"]):
        p = f"layers.{i}."
        h = rms(x, sd[p + "attention_norm.weight"], eps)
        fx = (h.reshape(B, K, C * cfg["dim"]) @ sd[p + "attention.compressor.weight"].T
              + sd[p + "attention.compressor.bias"])
        slots = torch.cat([sd[p + "attention.dummy_fx.weight"].expand(B, 1, -1), fx], 1)
        e = (h @ sd[p + "attention.expand.weight"].T).view(B, K, C, Dfx)
        seq = torch.cat([torch.cat([slots[:, k:k + 1], e[:, k]], 1) for k in range(K)] + [slots[:, K:]], 1)
        S = seq.shape[1]
        cos, sin = rope_cs(cfg["dim"] // cfg["n_head"], torch.arange(S) % G, cfg["rope_base"])
        y = attention(sd, p + "attention.attention.", seq, cfg, cos, sin, interleaved_mask(S, G),
                      n_head=Dfx // 64, head_dim=64)
        idx = [(t // C + 1) * G if t % C == C - 1 else (t // C) * G + 1 + t % C for t in range(L)]
        x = x + y[:, idx] @ sd[p + "attention.final_proj.weight"].T
        x = x + mlp(sd, p + "feed_forward.", rms(x, sd[p + "ffn_norm.weight"], eps))
    return rms(x, sd["norm.weight"], eps) @ sd["output.weight"].T
