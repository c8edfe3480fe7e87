"""Distributed checkpoints (DCP): save, verify, resume, retention.

Layout of ``<run_dir>/checkpoints/step-N/``:

- DCP shard files ``__R_0.distcp`` and ``.metadata``: ``app.model.*`` and ``app.optim.*``
  (model and AdamW state through ``get_state_dict``, so any FSDP/HSDP/TP layout can load
  them), ``train.*`` (step, token count, LR schedule, global data-loader position,
  curriculum) and ``train.rng.rank-R.*`` (each rank's CPU and CUDA generator states);
- ``meta.json``: what the checkpoint is (format version, step, tokens, model arguments and
  shape, tokenizer, resolved config, parallel layout, torch and cat_titan versions);
- ``COMPLETE``, written by rank 0 last, after every rank's shards (also those of an async
  save) are on disk and ``meta.json`` is written.

A directory without ``COMPLETE`` is an interrupted save: resume skips it with a warning
and the next save of the same step replaces it; retention removes it. A directory *with*
``COMPLETE`` whose files are missing, truncated or unreadable is corrupt: it is refused
with an error naming the file, never skipped silently.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.checkpoint.stateful import Stateful

from ..confutil import write_atomic

MARKER = "COMPLETE"
META = "meta.json"
DCP_METADATA = ".metadata"
FORMAT_VERSION = 1
MODEL_PREFIX = "app.model."  # DCP keys of the model weights (see Trainer._stateful)
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (incomplete, corrupt, or for a different model)."""


# ---------------------------------------------------------------------------------------
# finding and verifying checkpoints (no process group needed)
# ---------------------------------------------------------------------------------------
def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    out = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(out)


def is_complete(path: Path) -> bool:
    """The save finished (the marker is there); says nothing about corruption since."""
    return (Path(path) / MARKER).is_file()


def complete_steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    return [(s, p) for s, p in step_dirs(run_dir) if is_complete(p)]


def latest_complete(run_dir: str | Path, warn: bool = True) -> Optional[Path]:
    newest = None
    for step, path in step_dirs(run_dir):
        if is_complete(path):
            newest = path
        elif warn:
            warnings.warn(f"skipping incomplete checkpoint {path} (no {MARKER} marker: its save was interrupted); "
                          f"it is replaced or removed by the next save", stacklevel=2)
    return newest


def _fix(path: Path) -> str:
    return (f"delete {path} (checkpoint.resume=auto then continues from the previous complete checkpoint) or "
            f"choose another one with checkpoint.resume=PATH")


def read_meta(path: str | Path) -> dict:
    """meta.json of a checkpoint that claims to be complete; CheckpointError if unusable."""
    path = Path(path)
    if not is_complete(path):
        raise CheckpointError(f"{path} is not a complete checkpoint (no {MARKER} marker: its save was interrupted "
                              f"or it is not a checkpoint directory)")
    file = path / META
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is corrupt; {_fix(path)}")
    try:
        meta = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is corrupt ({e}); {_fix(path)}") from e
    missing = [k for k in ("format_version", "step", "model_args") if not isinstance(meta, dict)
               or k not in meta]
    if missing:
        raise CheckpointError(f"{file} lacks {missing}: corrupt, or written by another program; {_fix(path)}")
    if meta["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{file}: checkpoint format {meta['format_version']} is newer than this cat_titan "
                              f"reads ({FORMAT_VERSION}); update cat_titan")
    return meta


def read_dcp_metadata(path: str | Path):
    """DCP's ``.metadata`` (tensor sizes, dtypes and where each piece is stored)."""
    path = Path(path)
    file = path / DCP_METADATA
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: the checkpoint is corrupt; {_fix(path)}")
    try:
        md = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # unpickling garbage raises anything from EOFError to UnpicklingError
        raise CheckpointError(f"{file} is unreadable ({type(e).__name__}: {e}); the checkpoint is corrupt; "
                              f"{_fix(path)}") from e
    if not getattr(md, "state_dict_metadata", None):
        raise CheckpointError(f"{file} describes no tensors; the checkpoint is corrupt; {_fix(path)}")
    return md


def verify_checkpoint(path: str | Path) -> dict:
    """Every check possible without loading tensors: marker, meta.json, ``.metadata``, and
    that each shard file exists and is long enough for what ``.metadata`` says it holds
    (a truncated copy or an interrupted rsync). Returns meta.json."""
    path = Path(path)
    meta = read_meta(path)
    md = read_dcp_metadata(path)
    ends: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is not None:
            ends[rel] = max(ends.get(rel, 0), info.offset + info.length)
    for rel, end in sorted(ends.items()):
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file} is missing: the checkpoint is corrupt; {_fix(path)}")
        size = file.stat().st_size
        if size < end:
            raise CheckpointError(f"{file} is truncated ({size} bytes, .metadata needs {end}); the checkpoint is "
                                  f"corrupt; {_fix(path)}")
    return meta


_UNUSED = {  # ModelArgs.SHAPE_FIELDS a model kind does not read
    "dense": ("chunk_size", "compressor_dim", "compressor_layers", "compressor_heads", "compressor_kv_heads",
              "compressor_intermediate_size", "dim_fx", "layer_pattern", "cat_layer_head_dim"),
    "cat": ("layer_pattern", "cat_layer_head_dim"),
    "cat_adaptive": ("layer_pattern", "cat_layer_head_dim"),
    "cat_layer": ("compressor_dim", "compressor_layers", "compressor_heads", "compressor_kv_heads",
                  "compressor_intermediate_size"),
}


def model_shape(args) -> dict:
    """The ModelArgs fields that decide parameter names and shapes, defaults resolved
    (n_kv_heads None and n_kv_heads == n_heads are the same model) and fields the model kind
    does not use left out, so that only real differences are reported."""
    shape = args.shape_dict()
    shape.update(n_kv_heads=args.kv_heads, intermediate_size=args.ffn_dim, compressor_kv_heads=args.c_kv_heads,
                 compressor_intermediate_size=args.c_ffn_dim, dim_fx=args.fx_dim)
    if args.kind == "cat_layer":
        shape["layer_pattern"] = args.layer_kinds()
    for name in _UNUSED.get(args.kind, ()):
        shape.pop(name, None)
    return shape


def shape_differences(saved, current) -> dict:
    """{field: (saved, current)} between two ModelArgs."""
    a, b = model_shape(saved), model_shape(current)
    return {k: (a.get(k), b.get(k)) for k in {**a, **b} if a.get(k) != b.get(k)}


def saved_model_args(meta: dict, path: Path):
    from ..confutil import ConfigError, from_dict
    from ..models.args import ModelArgs

    try:
        return from_dict(ModelArgs, meta["model_args"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{path / META}: model_args is corrupt ({e}); {_fix(path)}") from e


def check_model_matches(path: Path, current, meta: Optional[dict] = None) -> None:
    """Refuse a checkpoint saved for a model of another shape; ``current`` is ModelArgs."""
    meta = meta if meta is not None else verify_checkpoint(path)
    diff = shape_differences(saved_model_args(meta, path), current)
    if diff:
        lines = ", ".join(f"model.{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in sorted(diff.items()))
        raise CheckpointError(f"checkpoint {path} was saved for a different model ({lines}). Use the checkpoint's "
                              f"model settings, or start a new job.run_dir (checkpoint.init_from cannot change "
                              f"shapes either)")


def _origin(path: Path, meta: dict) -> dict:
    """A checkpoint named as the origin of a history (``history_origin``)."""
    return {"path": str(path.resolve()), "step": int(meta["step"])}


def history_origin(resume: Optional[Path], run_dir: str | Path, meta: Optional[dict] = None) -> Optional[dict]:
    """Where the history a run continues began, stored in every checkpoint's meta.json as
    ``origin``: None for a run started afresh (or from weights, checkpoint.init_from); the
    checkpoint itself when resumed from another run directory's checkpoint; inherited when
    resumed from one of its own. meta: ``resume``'s meta.json, if already read."""
    if resume is None:
        return None
    meta = meta if meta is not None else read_meta(resume)
    if resume.resolve().parent == checkpoint_root(run_dir).resolve():
        return meta.get("origin")
    return _origin(resume, meta)


def resolve_resume(run_dir: str | Path, resume: str) -> Optional[Path]:
    """The verified checkpoint to resume from, None for a fresh start, or CheckpointError.

    ``auto``: the newest complete checkpoint of the run directory (incomplete ones are
    skipped with a warning; a corrupt newest one is an error, not a silent fallback).
    ``never``: a fresh start, refused if the run directory already holds complete
    checkpoints (new saves would collide with them). A path: that checkpoint, or the newest
    complete one of a run directory. If this run directory holds complete checkpoints newer
    than it: when they all descend from that checkpoint (their ``origin``, see
    ``history_origin``), this is the same job requeued after a preemption and it continues
    from the newest of them; otherwise refused (the two histories would mix).
    """
    run_dir = Path(run_dir)
    existing = complete_steps(run_dir)
    if resume == "never":
        if existing:
            raise CheckpointError(f"checkpoint.resume=never but {checkpoint_root(run_dir)} holds complete "
                                  f"checkpoints (steps {[s for s, _ in existing]}) that new saves would collide "
                                  f"with; use a new job.run_dir, or resume (checkpoint.resume=auto, which is also "
                                  f"what a job that Slurm requeues needs)")
        return None
    if resume == "auto":
        path = latest_complete(run_dir)
        if path is not None:
            verify_checkpoint(path)
        return path
    path = Path(resume)
    if not path.exists():
        raise CheckpointError(f"checkpoint.resume={resume}: no such checkpoint or run directory")
    if checkpoint_root(path).is_dir():  # a run directory: its newest complete checkpoint
        newest = latest_complete(path)
        if newest is None:
            raise CheckpointError(f"checkpoint.resume={resume}: that run directory has no complete checkpoint")
        path = newest
    meta = verify_checkpoint(path)
    newer = [(s, p) for s, p in existing if s > int(meta["step"]) and p.resolve() != path.resolve()]
    steps = [s for s, _ in newer]
    if newer and all(read_meta(p).get("origin") == _origin(path, meta) for _, p in newer):
        newest = newer[-1][1]  # this job, requeued: its own newest checkpoint
        warnings.warn(f"checkpoint.resume={resume}: {checkpoint_root(run_dir)} already continues that checkpoint "
                      f"(steps {steps}); resuming from its newest, {newest}")
        verify_checkpoint(newest)
        return newest
    if newer:
        raise CheckpointError(f"checkpoint.resume={resume} is at step {meta['step']} but {checkpoint_root(run_dir)} "
                              f"holds newer complete checkpoints (steps {steps}) that this run would overwrite or "
                              f"mix with; resume into a new job.run_dir, or move those checkpoints away")
    return path


# ---------------------------------------------------------------------------------------
# what goes into a checkpoint
# ---------------------------------------------------------------------------------------
def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _rng_states() -> dict[str, torch.Tensor]:
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


class TrainState(Stateful):
    """Everything besides model and optimizer that a resumed run needs.

    The random generators are saved per rank (``rng.rank-R``); a run resumed on more ranks
    than saved gives rank R the state of saved rank R mod (saved world size). Nothing in
    the training step draws from them today (weights are initialised from their own seeded
    generators, the loader and curriculum are pure functions of seed and position), but
    dropout or sampling added later would be resumed exactly.
    """

    def __init__(self, scheduler, loader, curriculum):
        self.step = 0
        self.tokens_seen = 0
        self.scheduler, self.loader, self.curriculum = scheduler, loader, curriculum
        self._rng_to_load: Optional[tuple[str, dict[str, torch.Tensor]]] = None  # set by Checkpointer.load

    def state_dict(self) -> dict:
        if self._rng_to_load is not None:  # placeholders of the saved rank's states, filled by dcp.load
            key, rng = self._rng_to_load
        else:
            key, rng = f"rank-{_rank()}", _rng_states()
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "curriculum": self.curriculum.state_dict() if self.curriculum is not None else {},
            "rng": {key: rng},
        }

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.tokens_seen = int(sd["tokens_seen"])
        self.scheduler.load_state_dict(sd["scheduler"])
        self.loader.load_state_dict(sd["loader"])
        if self.curriculum is not None and sd.get("curriculum"):
            self.curriculum.load_state_dict(sd["curriculum"])
        (rng,) = sd["rng"].values()
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])

    def plan_rng_load(self, md) -> None:
        """Pick the saved rank whose generator states this rank restores (from ``.metadata``)."""
        prefix = "train.rng.rank-"
        saved: dict[int, dict[str, Any]] = {}
        for key, item in md.state_dict_metadata.items():
            if key.startswith(prefix):
                rank, kind = key[len(prefix):].split(".", 1)
                saved.setdefault(int(rank), {})[kind] = item
        if not saved:
            raise CheckpointError("the checkpoint holds no RNG states (train.rng.*); it was not written by this "
                                  "version of cat_titan")
        src = _rank() % len(saved) if len(saved) == max(saved) + 1 else min(saved)
        self._rng_to_load = (f"rank-{src}", {kind: torch.empty(tuple(item.size), dtype=item.properties.dtype)
                                             for kind, item in saved[src].items()})

    def done_loading(self) -> None:
        self._rng_to_load = None


class ModelOptim(Stateful):
    """Model + optimizer through the distributed state-dict API (FSDP/TP aware, reshardable)."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict:
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, sd: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


# ---------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_checkpoint(path: Path) -> None:
    """Marker first: a deletion interrupted half-way leaves an incomplete directory (skipped and
    cleaned up later), never a 'complete' one with shards missing."""
    marker = path / MARKER
    if marker.exists():
        marker.unlink()
        _fsync_dir(path)
    shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """Saves ``{"app": ModelOptim, "train": TrainState}`` to ``checkpoints/step-N``.

    Every method is collective (all ranks call it in the same order). With ``async_save``
    the shards are written by a background thread over a separate gloo group while
    training continues; :meth:`finalize_pending` (called once every rank reports its write
    finished, see ``Trainer._agree``) or the next :meth:`save`/:meth:`wait` writes
    ``meta.json`` and the marker. Never more than one save is in flight.
    """

    def __init__(self, run_dir: Path, *, keep: int, keep_every: int, async_save: bool, is_main: bool,
                 meta: dict, async_group=None):
        self.run_dir, self.keep, self.keep_every = Path(run_dir), keep, keep_every
        self.async_save, self.is_main, self.meta = async_save, is_main, meta
        self.async_group = async_group
        self._pending: Optional[tuple[Any, Path, int, dict, float]] = None  # future, path, step, info, t0
        self.last_step: Optional[int] = None  # the step of the newest save started by this process

    # -- save ------------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Stateful], info: Optional[dict] = None,
             blocking: bool = False) -> Path:
        path = checkpoint_root(self.run_dir) / f"step-{step}"
        self.wait()  # never two saves in flight
        if self.last_step == step:  # e.g. the interval save and a preemption at the same step
            return path
        self.last_step = step
        if self.is_main:
            if is_complete(path):  # resolve_resume refuses runs that could get here
                raise CheckpointError(f"{path} already holds a complete checkpoint; refusing to overwrite it")
            if path.exists():  # an interrupted save of this step: replace it
                shutil.rmtree(path)
            path.mkdir(parents=True)
        dist.barrier()
        info = dict(info or {})
        t0 = time.time()
        if self.async_save and not blocking:
            future = dcp.async_save(state, checkpoint_id=str(path), process_group=self.async_group)
            self._pending = (future, path, step, info, t0)
        else:
            dcp.save(state, checkpoint_id=str(path))
            self._finalize(path, step, info, t0)
        return path

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def pending_done_locally(self) -> bool:
        """This rank's part of the async save is written (no pending save counts as done)."""
        return self._pending is None or self._pending[0].done()

    def finalize_pending(self) -> None:
        self.wait()

    def wait(self) -> None:
        """Block until the pending async save is written everywhere, then mark it complete."""
        if self._pending is None:
            return
        future, path, step, info, t0 = self._pending
        self._pending = None
        future.result()  # raises this rank's write error, if any
        self._finalize(path, step, info, t0)

    def close(self) -> None:
        """Finish the pending save and release the async group (collective)."""
        self.wait()
        if self.async_group is not None:
            dist.destroy_process_group(self.async_group)
            self.async_group = None

    def _finalize(self, path: Path, step: int, info: dict, t0: float) -> None:
        dist.barrier()  # every rank's shards are on disk
        if self.is_main:
            meta = {"format_version": FORMAT_VERSION, **self.meta, "step": step, **info, "saved_at": time.time()}
            write_atomic(path / META, json.dumps(meta, indent=1))
            write_atomic(path / MARKER, f"step {step}\n")  # written last
            _fsync_dir(path)
            self._retain()
            print(f"[checkpoint] saved {path} ({time.time() - t0:.1f}s)", flush=True)
        dist.barrier()  # when save() or wait() returns on any rank, the checkpoint is complete

    def _retain(self) -> None:
        """Keep the newest ``keep`` complete checkpoints and every ``keep_every``-th; remove
        incomplete directories (no save is in flight when this runs, so they are leftovers
        of interrupted saves)."""
        complete = complete_steps(self.run_dir)
        if not complete:
            return
        keep = {s for s, _ in complete[-self.keep:]} | {complete[-1][0]}
        if self.keep_every:
            keep |= {s for s, _ in complete if s % self.keep_every == 0}
        for s, p in step_dirs(self.run_dir):
            if not is_complete(p) or s not in keep:
                remove_checkpoint(p)

    # -- load ------------------------------------------------------------------------------
    @staticmethod
    def load(path: Path, state: dict[str, Stateful]) -> None:
        """Collective: every rank loads its part of a (verified) checkpoint, resharding as needed."""
        md = read_dcp_metadata(path)
        train = state.get("train")
        if isinstance(train, TrainState):
            train.plan_rng_load(md)
        from ..data.shards import DataError

        try:
            dcp.load(state, checkpoint_id=str(path))
        except DataError:  # the checkpoint is fine; the data or stream settings changed (the caller says so)
            raise
        except Exception as e:
            raise CheckpointError(f"could not load checkpoint {path}: {type(e).__name__}: {e}; {_fix(path)}") from e
        finally:
            if isinstance(train, TrainState):
                train.done_loading()


# ---------------------------------------------------------------------------------------
# weights only
# ---------------------------------------------------------------------------------------
def load_model_weights(model, path: Path) -> None:
    """Weights only (checkpoint.init_from): a DCP checkpoint directory or an exported
    ``.safetensors`` file (cat_titan or reference format). Collective under FSDP/TP."""
    path = Path(path)
    if path.is_file():
        from ..export import read_exported

        _, sd, _ = read_exported(path)
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
        return
    msd = get_model_state_dict(model)
    try:
        dcp.load({"app": {"model": msd}}, checkpoint_id=str(path))
    except Exception as e:
        raise CheckpointError(f"could not load the weights of {path}: {type(e).__name__}: {e}") from e
    set_model_state_dict(model, msd)
