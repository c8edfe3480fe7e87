"""What every cat_titan model shares: arguments, input checks, buffers, initialisation."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .args import ModelArgs
from .init import Initializer


IGNORE_INDEX = -100  # label of positions the loss skips


class ModelInputError(ValueError):
    """Bad input to a model's forward pass (wrong chunk size, too long, bad token ids)."""


class BaseModel(nn.Module):
    args: ModelArgs
    # The token sequence of dense and hybrid stacks is right-padded to a multiple of this.
    # parallelize sets it to the TP degree under sequence parallel, so every sequence shard
    # is even: torch 2.11's DTensor linear fails on the uneven shards of other lengths
    # ("view size is not compatible", reproduced on CPU; 2.13 pads them internally).
    seq_pad_multiple: int = 1

    # -- inputs ------------------------------------------------------------------------------
    def resolve_chunk_size(self, chunk_size: Optional[int]) -> int:
        valid = self.args.chunk_sizes
        if chunk_size is None:
            return max(valid) if valid else 0
        if not valid:
            raise ModelInputError(f"chunk_size={chunk_size} was given but a {self.args.kind} model has no chunks")
        if chunk_size not in valid:
            raise ModelInputError(f"chunk_size={chunk_size} is not valid for this {self.args.kind} model; "
                                  f"valid chunk sizes: {list(valid)}")
        return chunk_size

    def check_tokens(self, tokens: Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise ModelInputError(f"tokens must be an integer tensor of shape (batch, seq_len); "
                                  f"got {tuple(tokens.shape)} {tokens.dtype}")
        if tokens.shape[1] > self.args.block_size:
            raise ModelInputError(f"sequence length {tokens.shape[1]} exceeds the model's block_size "
                                  f"{self.args.block_size}; shorten the input or build the model with a "
                                  f"larger model.block_size")
        # A range check needs a device->host sync: done where it is free (CPU) and outside
        # compiled graphs. On CUDA an out-of-range id trips the embedding's device assert.
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling() and tokens.numel():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.args.padded_vocab_size:
                raise ModelInputError(f"token ids must lie in [0, {self.args.padded_vocab_size}); got ids in "
                                      f"[{lo}, {hi}] (does the tokenizer match model.vocab_size="
                                      f"{self.args.vocab_size}?)")

    def pad_sequence(self, tokens: Tensor, labels: Optional[Tensor], multiple: int,
                     fallback: int = 1) -> tuple[Tensor, Optional[Tensor]]:
        """Right-pad tokens (B, L) to a multiple of ``multiple`` (of ``fallback`` where that
        would pass block_size, where the rope tables end), labels with IGNORE_INDEX. Causal
        models only: trailing tokens cannot change earlier outputs, and ignored labels leave
        the mean loss unchanged. Drop the extra outputs with ``unpad``."""
        L = tokens.shape[1]
        extra = -L % multiple
        if L + extra > self.args.block_size:
            extra = -L % fallback
        if not extra:
            return tokens, labels
        tokens = F.pad(tokens, (0, extra), value=0)
        return tokens, None if labels is None else F.pad(labels, (0, extra), value=IGNORE_INDEX)

    @staticmethod
    def unpad(out: Tensor, labels: Optional[Tensor], length: int) -> Tensor:
        """The head's output for the first ``length`` positions (a loss needs nothing)."""
        return out if labels is not None or out.shape[1] == length else out[:, :length]

    # -- buffers and weights -------------------------------------------------------------------
    def init_buffers(self) -> None:
        """(Re)compute non-persistent buffers, e.g. after ``to_empty``."""
        for m in self.modules():
            if m is not self and hasattr(m, "init_buffers"):
                m.init_buffers()

    @torch.no_grad()
    def init_weights(self, seed: int = 0, device: torch.device | str | None = None) -> None:
        """Deterministic initialisation under ``seed``, identical for any parallel layout."""
        if device is None:
            p = next(self.parameters())
            device = p.device if p.device.type != "meta" else "cpu"
        self.init_buffers()
        self._init_params(Initializer(seed, device))

    def _init_params(self, init: Initializer) -> None:
        """The trunk every model has: token embeddings, blocks, final norm, output head."""
        from .common import init_stds

        std, out_std = init_stds(self.args.dim, self.args.n_layers)
        init.normal(self.tok_embeddings.weight, std)
        for layer in self.layers:
            layer.init_weights(init, std, out_std)
        self.head.norm.init_weights(init)
        init.normal(self.head.output.weight, std)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Embedding))
        return n


class RopeBuffer(nn.Module):
    """cos/sin tables as non-persistent buffers (recomputed by init_buffers after to_empty)."""

    def __init__(self, n_elem: int, length: int, base: float):
        super().__init__()
        self.n_elem, self.length, self.base = n_elem, length, base
        self.register_buffer("cos", torch.empty(length, n_elem), persistent=False)
        self.register_buffer("sin", torch.empty(length, n_elem), persistent=False)
        if self.cos.device.type != "meta":
            self.init_buffers()

    def init_buffers(self) -> None:
        from .common import rope_table

        cos, sin = rope_table(self.n_elem, self.length, self.base, device=self.cos.device)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def _apply(self, fn, recurse=True):
        # Module.to(bf16) casts every floating buffer. bf16 tables are off by up to 2^-9 relative,
        # so late positions rotate visibly wrong (apply_rope computes in float32 anyway): under a
        # cast to 16 bits, recompute them in float32 (casting back would keep the rounding).
        super()._apply(fn, recurse)
        if self.cos.element_size() < 4:
            self.cos = torch.empty(self.cos.shape, dtype=torch.float32, device=self.cos.device)
            self.sin = torch.empty(self.sin.shape, dtype=torch.float32, device=self.sin.device)
            if self.cos.device.type != "meta":
                self.init_buffers()
        return self

    def gather(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """Tables at the given position ids: (S, n_elem) each."""
        return self.cos[pos], self.sin[pos]

    def first(self, n: int) -> tuple[Tensor, Tensor]:
        return self.cos[:n], self.sin[:n]
