"""Distributed checkpoints (DCP): save, resume, retention, shape checks.

Layout of ``<run_dir>/checkpoints/step-N/``: DCP shard files and ``.metadata`` (model and
optimizer through ``get_state_dict``, plus the training state: step, token count, LR
schedule, data-loader position, curriculum, RNG), ``meta.json`` (resolved config, model
arguments, versions) and ``COMPLETE``, written by rank 0 after every rank has finished.
A directory without ``COMPLETE`` is an interrupted save: resume skips it with a warning.
"""

from __future__ import annotations

import json
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

MARKER = "COMPLETE"
META = "meta.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, corrupt, or for a different model)."""


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(out)


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / META).is_file() and (path / ".metadata").is_file()


def latest_complete(run_dir: str | Path, warn: bool = True) -> Optional[Path]:
    newest = None
    for step, path in step_dirs(run_dir):
        if is_complete(path):
            newest = path
        elif warn:
            warnings.warn(f"skipping incomplete checkpoint {path} (no {MARKER} marker: the save was interrupted)")
    return newest


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (expected {MARKER}, {META} and DCP .metadata)")
    try:
        return json.loads((path / META).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path / META} is corrupt ({e}); this checkpoint cannot be used") from e


def resolve_resume(run_dir: str | Path, resume: str) -> Optional[Path]:
    """The checkpoint to resume from: None for a fresh start."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_complete(run_dir)
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint directory")
    if not is_complete(path):
        raise CheckpointError(f"checkpoint.resume={resume} is not a complete checkpoint (no {MARKER} marker)")
    return path


def model_differences(saved: dict, current: dict) -> dict:
    return {k: (saved.get(k), current.get(k)) for k in current if saved.get(k) != current.get(k)}


def check_model_matches(path: Path, current_shape: dict) -> None:
    meta = read_meta(path)
    diff = model_differences(meta["model_shape"], current_shape)
    if diff:
        lines = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} was saved for a different model ({lines}). Use the checkpoint's "
                              f"model settings, or start a new run directory (checkpoint.init_from cannot "
                              f"change shapes either)")


class TrainState(Stateful):
    """Everything besides model and optimizer that a resumed run needs."""

    def __init__(self, scheduler, loader, curriculum):
        self.step = 0
        self.tokens_seen = 0
        self.scheduler, self.loader, self.curriculum = scheduler, loader, curriculum

    def state_dict(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else {},
            "rng_cpu": torch.get_rng_state(),
        }

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.tokens_seen = int(sd["tokens_seen"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.loader.load_state_dict(sd["loader"])
        if self.curriculum is not None and sd.get("curriculum"):
            self.curriculum.load_state_dict(sd["curriculum"])
        torch.set_rng_state(sd["rng_cpu"])


class ModelOptim(Stateful):
    """Model + optimizer through the distributed state-dict API (FSDP/TP aware, reshardable)."""

    def __init__(self, model, optimizer, load_optimizer: bool = True):
        self.model, self.optimizer, self.load_optimizer = model, optimizer, load_optimizer

    def state_dict(self) -> dict:
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, sd: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


class Checkpointer:
    def __init__(self, run_dir: Path, *, keep: int, keep_every: int, async_save: bool, is_main: bool,
                 meta: dict, async_group=None):
        self.run_dir, self.keep, self.keep_every = Path(run_dir), keep, keep_every
        self.async_save, self.is_main, self.meta = async_save, is_main, meta
        self.async_group = async_group
        self._pending: Optional[tuple[Any, Path, int]] = None  # (future, path, step)

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Stateful]) -> Path:
        self.wait()  # never two saves in flight
        path = checkpoint_root(self.run_dir) / f"step-{step}"
        if self.is_main:
            if path.exists():  # an interrupted save of this step (no marker): replace it
                if is_complete(path):
                    raise CheckpointError(f"{path} already holds a complete checkpoint; refusing to overwrite")
                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier()
        t0 = time.time()
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=str(path), process_group=self.async_group)
            self._pending = (future, path, step)
        else:
            dcp.save(state, checkpoint_id=str(path))
            self._finalize(path, step, time.time() - t0)
        return path

    def wait(self) -> None:
        if self._pending is None:
            return
        future, path, step = self._pending
        self._pending = None
        future.result()
        self._finalize(path, step, None)

    def _finalize(self, path: Path, step: int, seconds: Optional[float]) -> None:
        dist.barrier()  # every rank's shards are on disk
        if self.is_main:
            (path / META).write_text(json.dumps({**self.meta, "step": step, "saved_at": time.time()}, indent=1))
            (path / MARKER).write_text(f"step {step}\n")  # written last
            self._retain()
            if seconds is not None:
                print(f"[checkpoint] saved {path} in {seconds:.1f}s", flush=True)
        dist.barrier()

    def _retain(self) -> None:
        complete = [(s, p) for s, p in step_dirs(self.run_dir) if is_complete(p)]
        if not complete:
            return
        newest = complete[-1][0]
        keep = {s for s, _ in complete[-self.keep:]} | {newest}
        if self.keep_every:
            keep |= {s for s, _ in complete if s % self.keep_every == 0}
        for s, p in complete:
            if s not in keep:
                shutil.rmtree(p, ignore_errors=True)

    # -- load ------------------------------------------------------------------------------
    @staticmethod
    def load(path: Path, state: dict[str, Stateful]) -> None:
        dcp.load(state, checkpoint_id=str(path))


def load_model_weights(model, path: Path) -> None:
    """Weights only (checkpoint.init_from): a DCP checkpoint directory or an exported file."""
    path = Path(path)
    if path.is_file():
        from safetensors.torch import load_file

        sd = load_file(str(path))
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    read_meta(path)
    msd = get_model_state_dict(model)
    dcp.load({"app": {"model": msd}}, checkpoint_id=str(path))
    set_model_state_dict(model, msd)
