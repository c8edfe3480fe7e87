"""A trained model plus what its file says about it (tokenizer, training config, step), for
the generation and evaluation tools.

    pre = load_model("runs/x/export.safetensors", device="cuda", dtype=torch.bfloat16)
    pre.model, pre.tokenizer_spec, pre.train_config["data"]["seq_len"], pre.step

The weights come from ``cat_titan.load_pretrained`` (an exported ``.safetensors`` file, a
checkpoint directory or a run directory: its newest complete checkpoint); the description
from the file's safetensors metadata or the checkpoint's ``meta.json``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..export import ExportError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Pretrained:
    model: torch.nn.Module
    path: Path
    tokenizer_spec: Optional[str]
    """The tokenizer the model was trained with ('byte', 'gpt2', 'file:...'); None if unknown."""
    tokenizer_info: dict = field(default_factory=dict)
    """The data manifest's tokenizer identity (spec, vocab_size, eot_id, sha256), if recorded."""
    train_config: dict = field(default_factory=dict)
    """The run's resolved config as a dict ({} for files from elsewhere)."""
    step: Optional[int] = None
    """Optimizer steps the weights were trained for, if recorded."""

    @property
    def kind(self) -> str:
        return self.model.args.kind

    @property
    def label(self) -> str:
        """A short name: the file's stem, or the run directory's name."""
        return path_label(self.path)

    def section(self, name: str) -> dict:
        value = self.train_config.get(name)
        return value if isinstance(value, dict) else {}


def path_label(path: str | Path) -> str:
    """A short name for a model path: the file's stem, or the run directory's name."""
    p = Path(path)
    if p.is_dir() and p.name.startswith("step-") and p.parent.name == "checkpoints":
        return p.parent.parent.name
    return p.stem if p.is_file() else p.name


def distinct_labels(paths: list[str | Path]) -> list[str]:
    """``path_label`` of each path; where labels collide (runs/a/model.safetensors and
    runs/b/model.safetensors are both "model"), the shortest path suffix that tells the
    colliding paths apart instead ("a/model", "b/model")."""
    def parts(path) -> tuple[str, ...]:
        # absolute, so "model.safetensors" and "../b/model.safetensors" differ; symlinks kept as named
        p = Path(os.path.abspath(path))
        return (*p.parent.parts, p.stem) if p.is_file() else p.parts

    labels = [path_label(p) for p in paths]
    for label in set(labels):
        group = {i: parts(paths[i]) for i, x in enumerate(labels) if x == label}
        if len(group) < 2:
            continue
        longest = max(map(len, group.values()))
        for k in range(1, longest + 1):
            tails = {i: str(Path(*ps[-k:])) for i, ps in group.items()}
            if len(set(tails.values())) == len(group) or k == longest:  # the same path twice never differs
                for i, tail in tails.items():
                    labels[i] = tail
                break
    return labels


def resolve_dtype(name: str, device: torch.device) -> Optional[torch.dtype]:
    """'auto' -> bf16 on CUDA, float32 elsewhere; 'stored' -> None (keep the file's dtype)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "stored":
        return None
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not one of auto, stored, {', '.join(DTYPES)}")
    return DTYPES[name]


def read_description(path: str | Path) -> dict:
    """(tokenizer, tokenizer_info, train_config, step) of an exported file or a checkpoint/run dir."""
    path = Path(path)
    if path.is_dir():
        from ..export import resolve_checkpoint
        from ..train.checkpoint import CheckpointError, read_meta

        ckpt = resolve_checkpoint(path)
        try:
            meta = read_meta(ckpt)
        except CheckpointError as e:
            raise ExportError(str(e)) from e
        return {"tokenizer": meta.get("tokenizer") or None, "tokenizer_info": meta.get("tokenizer_info") or {},
                "train_config": meta.get("config") or {}, "step": meta.get("step")}
    from ..export import read_exported_metadata

    meta = read_exported_metadata(path)

    def js(key):
        try:
            return json.loads(meta.get(key) or "{}")
        except json.JSONDecodeError:
            return {}

    step = meta.get("step")
    return {"tokenizer": meta.get("tokenizer") or None, "tokenizer_info": js("tokenizer_info"),
            "train_config": js("train_config"), "step": int(step) if step and step.isdigit() else None}


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None
               ) -> Pretrained:
    """The model (eval mode, on ``device``, in ``dtype``; None keeps the stored dtype) and its
    description. Raises ``ExportError`` with an actionable message for a missing or bad path."""
    from .. import load_pretrained

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such file or directory; pass an exported .safetensors file "
                          f"(tools/export.py), a checkpoint directory or a run directory")
    desc = read_description(path)
    model = load_pretrained(path, device=device, dtype=dtype)
    return Pretrained(model=model, path=path, tokenizer_spec=desc["tokenizer"],
                      tokenizer_info=desc["tokenizer_info"], train_config=desc["train_config"], step=desc["step"])


def trained_chunk_sizes(pre: Pretrained) -> list[Optional[int]]:
    """The chunk sizes to evaluate a model at: those an adaptive CAT's training curriculum
    drew (all its valid sizes if the run's curriculum is unknown); [None] for every other kind.
    Raises ``ConfigError`` (a ValueError) for a recorded curriculum that does not parse."""
    args = pre.model.args
    if args.kind != "cat_adaptive":
        return [None]
    if not pre.section("curriculum"):
        return list(args.chunk_sizes)
    from .. import confutil
    from ..config import CurriculumConfig
    from ..train.curriculum import build_curriculum

    # The trainer's own schedule, so that evaluation cannot claim a size training never drew.
    cfg = confutil.from_dict(CurriculumConfig, pre.section("curriculum"), path="curriculum")
    return build_curriculum(args, cfg, seed=0).drawn_sizes
