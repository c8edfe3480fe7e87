"""Helpers of the generation tests: tiny perturbed models and the full-forward oracle."""

import torch

from cat_titan.models.registry import build_model, get_preset

_MODELS: dict = {}


def perturbed(name: str, runtime_device: str = "cpu"):
    """A debug preset with seed-0 weights plus small noise (norms and special embeddings
    off their init values), on CPU, in eval mode."""
    model = build_model(get_preset(name), seed=0, runtime_device=runtime_device)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def debug_model(name: str):
    """``perturbed(name)``, built once per session."""
    if name not in _MODELS:
        _MODELS[name] = perturbed(name)
    return _MODELS[name]


@torch.no_grad()
def greedy_by_full_forward(model, prompt: list[int], n: int, chunk_size=None) -> tuple[list[int], torch.Tensor]:
    """n greedy tokens (ids < vocab_size), re-running the whole prefix every step; also the
    logits (n, V_padded) each token was chosen from."""
    tokens, logits = list(prompt), []
    device = next(model.parameters()).device
    kw = {"chunk_size": chunk_size} if chunk_size else {}
    for _ in range(n):
        out = model(torch.tensor([tokens], device=device), **kw)[0, -1]
        logits.append(out)
        tokens.append(int(out[: model.args.vocab_size].argmax()))
    return tokens[len(prompt):], torch.stack(logits)
