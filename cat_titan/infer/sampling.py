"""Next-token choice from logits: greedy, temperature, top-k, top-p.

Sync-free (no ``.item()``, no ``multinomial``): sampling draws ``probs / Exp(1)`` and takes
the argmax, which picks token i with probability probs[i] (the exponential race), so a
CUDA decode loop never waits on the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: Optional[int] = None
    """Keep only the k most likely tokens (None: all)."""
    top_p: Optional[float] = None
    """Keep the smallest set of most likely tokens whose probability reaches p (None: all)."""

    def validate(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1, or None for no top-k filter")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must lie in (0, 1], or None for no nucleus filter")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: Tensor, params: SamplingParams, vocab_size: int,
           generator: Optional[torch.Generator] = None) -> Tensor:
    """logits (B, V_padded) -> token ids (B,). Ids >= vocab_size (embedding padding) are
    never chosen."""
    logits = logits[:, :vocab_size]  # (B, V)
    if params.greedy:
        # In the logits' own dtype: widening is exact and order-preserving, so the argmax
        # (first of equal maxima) is the same, without materialising a float copy.
        return logits.argmax(-1)
    logits = logits.float()
    # Shifting the row max to 0 first leaves nothing that can overflow to +inf (or give
    # inf - inf = NaN in softmax) for a tiny T: the max stays 0 and the rest go to -inf.
    # T is clamped at float32's smallest normal, since below ~1e-45 it would round to 0 (0/0).
    t = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(-1, keepdim=True)) / t
    if params.top_k is not None and params.top_k < vocab_size:
        # Mask through topk's indices: exactly k tokens survive, however many tie with the k-th.
        top = logits.topk(params.top_k, dim=-1).indices  # (B, k)
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top, True)
        logits = logits.masked_fill(~keep, float("-inf"))
    if params.top_p is not None and params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked before it already reach top_p; the most
        # likely token always stays.
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator).clamp_min_(1e-20)
    return (probs / race).argmax(-1)
