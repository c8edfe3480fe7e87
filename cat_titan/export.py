"""A sharded DCP checkpoint -> one ``.safetensors`` file; ``load_pretrained`` rebuilds the model.

Export runs on CPU without GPUs or a process group: the model's tensors are allocated at
full size from the checkpoint's ``.metadata`` and filled by ``dcp.load(..., no_dist=True)``,
which reassembles them from however many ranks wrote them (optimizer state is never read).

File formats (safetensors metadata, all values strings):

- ``native`` (default): tensors under cat_titan's own names; ``format=cat_titan``.
- ``reference``: tensors under the reference implementation's names with the prefix
  ``model.`` and the reference's qkv layout, plus ``configs`` (the reference's config
  fields, see ../shared/fixtures/reference/README.md); ``format=reference``. The parity
  tool's loader (``cat_titan.parity.load_reference_file``) reads it back.

Both carry ``model_args`` (ModelArgs as JSON, enough for ``build_model``), ``tokenizer``
(the tokenizer spec, e.g. ``byte`` or ``gpt2``), ``tokenizer_info`` (JSON: the data
manifest's tokenizer identity), ``step``, ``tokens_seen``, ``dtype``, ``source`` (the
checkpoint directory), ``train_config`` (JSON: the run's resolved config), ``cat_titan``
and ``torch`` (versions).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import Tensor

from . import __version__, confutil
from .models.args import ModelArgs

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMATS = ("native", "reference")


class ExportError(ValueError):
    """A file or checkpoint that cannot be exported or loaded; the message says why and what to do."""


# ---------------------------------------------------------------------------------------
# checkpoint -> full CPU state dict
# ---------------------------------------------------------------------------------------
def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (setting and restoring
    it would briefly give files that other threads create meanwhile a umask of 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory as is; a run directory, or its ``checkpoints/`` folder -> its
    newest complete checkpoint."""
    from .train.checkpoint import DCP_METADATA, MARKER, META, checkpoint_root, latest_complete

    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such run or checkpoint directory")
    if path.is_file():
        if path.suffix == ".safetensors":
            raise ExportError(f"{path} is an exported weights file, not a checkpoint: it needs no export "
                              f"(cat_titan.load_pretrained reads it as is); to export again, pass the run "
                              f"directory or checkpoints/step-N directory it came from")
        raise ExportError(f"{path} is a file, not a run or checkpoint directory; pass a run directory "
                          f"(job.run_dir) or one of its checkpoints/step-N directories")
    if not checkpoint_root(path).is_dir() and checkpoint_root(path.parent) == path:
        path = path.parent  # the checkpoints/ folder itself means its run
    if checkpoint_root(path).is_dir():
        newest = latest_complete(path)
        if newest is None:
            raise ExportError(f"run directory {path} has no complete checkpoint (checkpoints/step-N/ with a "
                              f"COMPLETE marker); train longer, or pass a checkpoint directory")
        return newest
    # a directory inside checkpoints/ or holding checkpoint files is one (complete or not: the
    # checks that follow say which); any other is neither kind of directory
    in_run = checkpoint_root(path.parent.parent) == path.parent
    if not in_run and not any((path / name).exists() for name in (MARKER, META, DCP_METADATA)):
        raise ExportError(f"{path} is neither a run directory (it has no checkpoints/ folder) nor a checkpoint "
                          f"directory (no {MARKER}, {META} or {DCP_METADATA}); pass a run directory "
                          f"(job.run_dir) or one of its checkpoints/step-N directories")
    return path


def model_args_from_meta(meta: Mapping) -> ModelArgs:
    return confutil.from_dict(ModelArgs, meta["model_args"])


def load_checkpoint_weights(path: str | Path) -> tuple[ModelArgs, dict[str, Tensor], dict]:
    """(model args, full-size CPU model state dict, meta.json) of a checkpoint or run directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from .train.checkpoint import MODEL_PREFIX, CheckpointError, read_dcp_metadata, verify_checkpoint

    ckpt = resolve_checkpoint(path)
    try:
        meta = verify_checkpoint(ckpt)
        md = read_dcp_metadata(ckpt)
    except CheckpointError as e:
        raise ExportError(str(e)) from e
    sd = {key[len(MODEL_PREFIX):]: torch.empty(tuple(item.size), dtype=item.properties.dtype)
          for key, item in md.state_dict_metadata.items()
          if key.startswith(MODEL_PREFIX) and isinstance(item, TensorStorageMetadata)}
    if not sd:
        raise ExportError(f"{ckpt} holds no model weights ({MODEL_PREFIX}*); not a cat_titan training checkpoint")
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load({"app": {"model": sd}}, checkpoint_id=str(ckpt), no_dist=True)
    except Exception as e:
        raise ExportError(f"could not read the weights of {ckpt} ({type(e).__name__}: {e}); the checkpoint is "
                          f"corrupt; export another one") from e
    args = model_args_from_meta(meta)
    _check_against_model(sd, args, str(ckpt))
    return args, sd, {**meta, "source": str(ckpt)}


def _check_against_model(sd: Mapping[str, Tensor], args: ModelArgs, where: str) -> None:
    """Names and shapes equal those of a model built from ``args`` (strict loading later)."""
    from .models.reference import ReferenceFormatError, check_state_dict
    from .models.registry import build_model

    try:
        check_state_dict(sd, build_model(args, device="meta", runtime_device="cpu"))
    except ReferenceFormatError as e:
        raise ExportError(f"{where}: the weights do not match the model its metadata describes: {e}") from e


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------
def export(src: str | Path, out: str | Path, dtype: str | torch.dtype = "fp32", fmt: str = "native") -> dict:
    """Write the model weights of a checkpoint (or a run's newest one) to one safetensors file.
    Returns a summary (path, step, tensors, parameters, bytes)."""
    from safetensors.torch import save_file

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ExportError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
        dtype = DTYPES[dtype]
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} is not one of {list(FORMATS)}")
    args, sd, meta = load_checkpoint_weights(src)
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    info = {
        "format": "cat_titan",
        "model_args": json.dumps(confutil.to_dict(args)),
        "tokenizer": str(meta.get("tokenizer", "")),
        "tokenizer_info": json.dumps(meta.get("tokenizer_info", {})),
        "step": str(meta["step"]),
        "tokens_seen": str(meta.get("tokens_seen", "")),
        "dtype": str(dtype).removeprefix("torch."),
        "source": meta["source"],
        "train_config": json.dumps(meta.get("config", {})),
        "cat_titan": __version__,
        "torch": torch.__version__,
    }
    if fmt == "reference":
        from .models.reference import ReferenceFormatError, native_to_reference, reference_configs

        try:
            configs = reference_configs(args)
            sd = {"model." + k: v for k, v in native_to_reference(sd, args).items()}
        except ReferenceFormatError as e:
            raise ExportError(f"cannot export {args.kind} to the reference format: {e}; use --format native") from e
        info.update(format="reference", configs=json.dumps(configs))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file(sd, str(tmp), metadata=info)
    # safetensors creates the file 0600; readable by whom the umask allows, as checkpoints are
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, out)  # a reader never sees a half-written file
    return {"path": str(out), "step": meta["step"], "source": meta["source"], "tensors": len(sd),
            "parameters": sum(v.numel() for v in sd.values()), "bytes": out.stat().st_size, "format": fmt,
            "dtype": info["dtype"]}


# ---------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------
def read_exported_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise ExportError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); re-export it "
                          f"with tools/export.py") from e


def exported_model_args(path: str | Path) -> ModelArgs:
    """The ModelArgs a weights file was saved for (metadata only, no tensors read)."""
    meta = read_exported_metadata(path)
    if "model_args" in meta:
        try:
            return confutil.from_dict(ModelArgs, json.loads(meta["model_args"]))
        except (json.JSONDecodeError, confutil.ConfigError) as e:
            raise ExportError(f"{path}: metadata 'model_args' is corrupt ({e}); re-export the file") from e
    if "configs" in meta:  # a reference-format file from elsewhere (e.g. the paper's authors)
        from safetensors import safe_open

        from .models.reference import args_from_reference, detect_kind

        with safe_open(str(path), "pt") as f:
            keys = [k[len("model."):] for k in f.keys() if k.startswith("model.")]
        configs = json.loads(meta["configs"])
        return args_from_reference(configs, detect_kind(configs, keys))
    raise ExportError(f"{path}: safetensors metadata has neither 'model_args' (cat_titan export) nor 'configs' "
                      f"(reference format); export checkpoints with tools/export.py")


def read_exported(path: str | Path) -> tuple[ModelArgs, dict[str, Tensor], dict]:
    """(model args, native state dict, metadata) of an exported file, either format."""
    from safetensors.torch import load_file

    args = exported_model_args(path)
    meta = read_exported_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as e:
        raise ExportError(f"{path}: cannot read tensors ({type(e).__name__}: {e}); the file is corrupt, "
                          f"re-export it") from e
    if meta.get("format") == "cat_titan":
        sd = tensors
    else:
        from .models.reference import ReferenceFormatError, reference_to_native

        try:
            sd = reference_to_native({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                                     args)
        except ReferenceFormatError as e:
            raise ExportError(f"{path}: {e}") from e
    _check_against_model(sd, args, str(path))
    return args, sd, meta


def load_pretrained(path: str | Path, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None):
    """Rebuild a model from an exported ``.safetensors`` file alone (either format), or from
    a DCP checkpoint / run directory, for fine-tuning, evaluation or generation.

    ``dtype=None`` keeps the stored floating dtype. The model is returned in eval mode.
    """
    from .models.registry import build_model

    path = Path(path)
    if path.is_dir():
        args, sd, _ = load_checkpoint_weights(path)
    else:
        args, sd, _ = read_exported(path)
    if dtype is None:
        dtype = next((v.dtype for v in sd.values() if v.is_floating_point()), torch.float32)
    # The attention backend and fused ops are how the training machine ran the model, not what
    # it is: chosen again for this device (a run trained with fused_ops=on loads on a CPU
    # without liger-kernel; same weights, same function).
    args = args.replace(attn_backend="auto", fused_ops="auto")
    model = build_model(args, device="meta", runtime_device=device)
    model.to_empty(device=device)
    model.load_state_dict(sd, strict=True)
    model.init_buffers()
    return model.to(dtype).eval()
