"""Apply parallelism and performance wrappers to a model built on the meta device.

Order (torchtitan's, for the same reasons):
1. tensor parallel first: it replaces parameters with DTensors on the TP mesh, which
   every later step must see;
2. activation checkpointing wraps whole blocks, so recomputation covers the TP collectives;
3. per-block ``torch.compile`` in place (no ``_orig_mod.`` in checkpoint keys), around the
   checkpoint wrapper so the recomputation is compiled too (FlexAttention stays compiled
   under selective checkpointing);
4. FSDP2 last, per block and then the root, so each block's all-gather can be prefetched
   while the previous block computes; it shards whatever the earlier steps produced.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .mesh import ParallelDims


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks of a model: decoder layers, and the compressor's for CATs."""
    lists = [model.layers]
    if hasattr(model, "compressor"):
        lists.append(model.compressor.layers)
    return lists


def refuse_unsupported(device_type: str, tp: int, compile_: bool) -> Optional[str]:
    """Combinations known to compute wrong results or crash: refuse them at start."""
    if tp > 1:
        return ("parallelism.tp > 1: tensor parallelism is not implemented yet in this version; "
                "use parallelism.tp=1 (FSDP/HSDP data parallelism works)")
    return None


# ---------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------
def _selective_policy():
    """Op-level selective checkpointing: keep matmul and attention outputs, recompute the
    cheap elementwise ops (norms, activations, RoPE)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default,
            aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_cudnn_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default}
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        save.add(flex)

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def apply_ac(model: nn.Module, mode: str, every: int = 2) -> None:
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    kwargs = {"preserve_rng_state": False}
    if mode == "selective":
        from functools import partial

        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = partial(create_selective_checkpoint_contexts, _selective_policy())
    for blocks in block_lists(model):
        for i, block in enumerate(blocks):
            if mode == "every_n" and i % every:
                continue
            blocks[i] = checkpoint_wrapper(block, **kwargs)


# ---------------------------------------------------------------------------------------
# compile and FSDP
# ---------------------------------------------------------------------------------------
def apply_compile(model: nn.Module) -> None:
    from torch._dynamo import config as dynamo_config

    # Adaptive CATs run one graph per chunk size; the curriculum must not hit the limit.
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
    for blocks in block_lists(model):
        for block in blocks:
            block.compile()


def apply_fsdp(model: nn.Module, pdims: ParallelDims, param_dtype: torch.dtype,
               reshard_after_forward: str = "default") -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = pdims.fsdp_mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    all_blocks = [b for blocks in block_lists(model) for b in blocks]
    for i, block in enumerate(all_blocks):
        # The last block's parameters are needed again at the start of backward.
        if reshard_after_forward == "default":
            reshard = i < len(all_blocks) - 1
        else:
            reshard = reshard_after_forward == "always"
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward != "never")


def parallelize(model: nn.Module, pdims: ParallelDims, *, compile_: bool, ac: str, ac_every: int,
                param_dtype: torch.dtype, use_fsdp: bool, reshard_after_forward: str = "default") -> nn.Module:
    """TP -> activation checkpointing -> per-block compile -> FSDP (see the module docstring)."""
    problem = refuse_unsupported(pdims.device.type, pdims.tp, compile_)
    if problem:
        raise ValueError(problem)
    apply_ac(model, ac, ac_every)
    if compile_:
        apply_compile(model)
    if use_fsdp:
        apply_fsdp(model, pdims, param_dtype, reshard_after_forward)
    return model


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on linear weights only: never on norms, embeddings or biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
