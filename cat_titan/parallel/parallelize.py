"""Apply parallelism and performance wrappers to a model built on the meta device.

Order (torchtitan's, for the same reasons):
1. tensor parallel first: it replaces parameters with DTensors on the TP mesh, which
   every later step must see (plans in tp.py);
2. activation checkpointing wraps whole blocks, so recomputation covers the TP collectives;
3. per-block ``torch.compile`` in place (no ``_orig_mod.`` in checkpoint keys), around the
   checkpoint wrapper so the recomputation is compiled too (FlexAttention stays compiled
   under selective checkpointing);
4. FSDP2 last, per block and then the root, so each block's all-gather can be prefetched
   while the previous block computes; it shards whatever the earlier steps produced (with
   TP: 2-D (dp_shard, tp) or, under HSDP, 3-D (dp_replicate, dp_shard, tp) parameters).

Sequence parallel (decided here): on for every decoder stack (dense, CAT decoder, hybrid),
off for the CAT compressor (its (B*K, prefix + c) batch changes shape with each chunk size
and is a small share of the activations). The CAT decoder's sequence [K+1 prefix slots |
L tokens] need not divide tp, so CAT decoders are *padded*: ``decoder_pad_multiple`` is
raised to a multiple of tp (pad positions attend only to themselves and their outputs are
dropped: results are unchanged, and every training shard is even). Dense and hybrid
stacks right-pad their token sequence to a multiple of tp (``seq_pad_multiple``; causal,
so the extra outputs are dropped and padded labels are ignored). Uneven shards, which torch
2.13 handles, crash torch 2.11's DTensor linear (found running the CPU suite under 2.11).

Loss parallel: under TP the head's logits are sharded by vocabulary; inside
``loss_parallel_context`` (the trainer wraps forward and backward in it) the cross-entropy
runs on the shards; elsewhere (evaluation, sampling) the logits are gathered. liger's fused
linear cross-entropy (CUDA) needs the whole vocabulary weight, so it is switched off under
TP; the other liger kernels keep running on local tensors, except the sequence-parallel
norms, which compute on DTensors (plain path; inductor fuses it under compile).

TP with torch.compile (torch 2.13, measured on CPU): torch's TP styles redistribute
asynchronously, and compiled blocks then crash in AOTAutograd's backward
(AsyncCollectiveTensor tangents), so tp.py's styles are synchronous; and inductor fails to
trace DTensor blocks with dynamic shapes (RecursionError, adaptive CAT), so TP blocks
compile one static graph per shape. With both, compiled TP matched the single-process
model (losses within 1e-6, every gradient within 3e-7) for the dense, CAT, adaptive-CAT
(4 chunk sizes) and hybrid debug models, and so did compiled FSDP x TP for dense, CAT and
hybrid (not measured: adaptive CAT under FSDP x TP, HSDP x TP, compile with AC under TP).

Refused at start (``refuse_unsupported``): tp > 1 with torch.compile on CPU, as reported
before those fixes (a crash in backward; a wrong embedding gradient under FSDP x TP); a
CPU compile of every model kind takes minutes, too long for the test suite to keep the
fixes verified. CUDA is not refused and not verified here: check a compiled TP run
against eager before relying on it.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

from .mesh import ParallelDims
from .tp import apply_tp, loss_parallel_context  # noqa: F401  (loss_parallel_context: for the trainer)


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The repeated blocks of a model: decoder layers, and the compressor's for CATs."""
    lists = [model.layers]
    if hasattr(model, "compressor"):
        lists.append(model.compressor.layers)
    return lists


def refuse_unsupported(device_type: str, tp: int, compile_: bool, ac: str = "none") -> Optional[str]:
    """Combinations known to compute wrong results or crash: refuse them at start."""
    if tp > 1 and compile_ and device_type == "cpu":
        return (f"parallelism.tp={tp} with training.compile=true is not supported on CPU: with torch "
                f"{torch.__version__.split('+')[0]} it crashed in backward, and FSDP x TP compiled gave a wrong "
                f"embedding gradient (eager is exact); compiling on CPU is too slow for the test suite to keep the "
                f"fixes verified; set training.compile=false or parallelism.tp=1")
    if tp > 1 and compile_ and ac != "none":
        # Measured (reference-sized CAT, 2 H200s, torch 2.11): full and selective crashed
        # (the last block's output stayed a DTensor), every_n trained but its loss drifted
        # 10x further from the other layouts than bf16 rounding moves them; on CPU (torch
        # 2.13) every_n and full failed in AOTAutograd and selective gave wrong gradients.
        return (f"parallelism.tp={tp} with training.compile=true and training.activation_checkpoint={ac} is not "
                f"supported: compiled activation checkpointing of tensor-parallel blocks crashed or computed wrong "
                f"gradients (measured on H200 with torch 2.11 and on CPU with torch 2.13); use "
                f"training.activation_checkpoint=none, or training.compile=false (eager TP with checkpointing is "
                f"exact), or parallelism.tp=1")
    return None


# ---------------------------------------------------------------------------------------
# activation checkpointing
# ---------------------------------------------------------------------------------------
def _selective_policy():
    """Op-level selective checkpointing: keep matmul and attention outputs (SDPA kernels and
    FlexAttention's higher-order op) and the outputs of TP reductions, recompute the cheap
    elementwise ops (norms, activations, RoPE) and the all-gathers."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default,
            aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_flash_attention.default,
            aten._scaled_dot_product_cudnn_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            torch.ops._c10d_functional.reduce_scatter_tensor.default,
            torch.ops._c10d_functional.all_reduce.default}
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
def recompile_limit(model: nn.Module) -> int:
    """Graphs each compiled block kind may need: one per chunk size (adaptive CATs change the
    compressor's and decoder's shapes with it), times grad mode (training / evaluation),
    times the kinds of block sharing the compiled frame, plus slack for other lengths
    (sampling; automatic dynamic shapes then make one graph cover them)."""
    sizes = max(1, len(model.args.chunk_sizes))
    kinds = {(type(b), type(getattr(b, "_checkpoint_wrapped_module", b))) for blocks in block_lists(model)
             for b in blocks}
    return 2 * sizes * len(kinds) + 8


def static_shapes(model: nn.Module, tp: int) -> bool:
    """Compile static graphs where shapes change by design: one per chunk size for adaptive
    CATs (automatic dynamic shapes would replace them, after the first size change, by one
    dynamic graph for every size: measured 15% slower on an H200 with the random curriculum),
    and always under TP (see apply_compile)."""
    return tp > 1 or model.args.kind == "cat_adaptive"


def apply_compile(model: nn.Module, dynamic: Optional[bool] = None) -> None:
    """``dynamic``: torch.compile's (None: static first, then dynamic shapes on a change).
    Tensor-parallel blocks compile with dynamic=False: one graph per shape (chunk size),
    because inductor failed to trace DTensor blocks with dynamic shapes (RecursionError,
    adaptive CAT, torch 2.13 on CPU)."""
    from torch._dynamo import config as dynamo_config

    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, recompile_limit(model))
    kwargs = {} if dynamic is None else {"dynamic": dynamic}
    for blocks in block_lists(model):
        for block in blocks:
            block.compile(**kwargs)  # in place: parameter names keep no "_orig_mod." prefix


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (to spot recompiles)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def apply_fsdp(model: nn.Module, pdims: ParallelDims, param_dtype: torch.dtype,
               reshard_after_forward: str = "default") -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = pdims.fsdp_mesh
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    all_blocks = [b for blocks in block_lists(model) for b in blocks]
    # "default": reshard after forward (all-gather again in backward) only where there is
    # something to shard: with one shard rank the "all-gather" is a copy and a bf16 cast of
    # every weight, done twice per step for nothing.
    if reshard_after_forward == "default" and pdims.dp_shard == 1:  # also HSDP with replicas of one shard
        reshard_after_forward = "never"

    def reshard(last_in_forward: bool) -> bool:
        if reshard_after_forward == "default":  # what backward needs first stays gathered
            return not last_in_forward
        return reshard_after_forward == "always"

    # The decoder's last block runs last in forward (a CAT's compressor runs first).
    for block in all_blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard(block is model.layers[-1]))
    # Embeddings and the output head are their own units (as in torchtitan): otherwise the
    # root gathers the head's vocabulary weight with the embeddings at the start of forward
    # and reduces its gradient only after the whole backward, with nothing to overlap.
    # They are called as modules, so FSDP's hooks see them (the CAT glue that model code
    # reads as raw .weight stays in the root).
    embeddings = [model.tok_embeddings] + ([model.compressor.tok_embeddings] if hasattr(model, "compressor") else [])
    for emb in embeddings:
        fully_shard(emb, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard(False))
    fully_shard(model.head, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard(True))
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward != "never")


def parallelize(model: nn.Module, pdims: ParallelDims, *, compile_: bool, ac: str, ac_every: int,
                param_dtype: torch.dtype, use_fsdp: bool, reshard_after_forward: str = "default",
                sequence_parallel: bool = True) -> nn.Module:
    """TP -> activation checkpointing -> per-block compile -> FSDP (see the module docstring)."""
    problem = refuse_unsupported(pdims.device.type, pdims.tp, compile_, ac)
    if problem:
        raise ValueError(problem)
    if pdims.tp > 1:
        apply_tp(model, pdims.tp_mesh, sequence_parallel)
        if sequence_parallel and model.args.kind in ("cat", "cat_adaptive"):
            model.decoder_pad_multiple = math.lcm(model.decoder_pad_multiple, pdims.tp)
        elif sequence_parallel:  # dense and hybrid token sequences (models/base.py)
            model.seq_pad_multiple = math.lcm(model.seq_pad_multiple, pdims.tp)
    apply_ac(model, ac, ac_every)
    if compile_:
        apply_compile(model, dynamic=False if static_shapes(model, pdims.tp) else None)
    if use_fsdp:
        apply_fsdp(model, pdims, param_dtype, reshard_after_forward)
    return model


def grad_norm(parameters: Iterable[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The parameters that have gradients, and the global gradient norm as a plain scalar
    tensor (nothing is clipped).

    Gradients may be plain tensors or DTensors on any meshes. A gradient whose placements
    differ from its parameter's (partial sums of replicated norm weights under sequence
    parallel, when no FSDP reduces them) is first reduced to the parameter's placements, so
    the optimizer sees the true gradient."""
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    by_mesh: dict = {}
    for p in params:
        g = p.grad
        if isinstance(g, DTensor) and isinstance(p, DTensor) and g.placements != p.placements:
            g = p.grad = g.redistribute(placements=p.placements)
        by_mesh.setdefault(g.device_mesh if isinstance(g, DTensor) else None, []).append(g)
    norms = []
    for grads in by_mesh.values():
        n = torch.nn.utils.get_total_norm(grads)
        norms.append(n.full_tensor() if isinstance(n, DTensor) else n)
    if not norms:
        return params, torch.zeros(())
    return params, norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm in place (``grad_norm``) and return it."""
    params, total = grad_norm(parameters)
    if params:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What clipping divides the gradients by, max(1, (norm + 1e-6) / max_norm): the
    reciprocal of ``clip_grads_with_norm_``'s factor, for fused AdamW's ``grad_scale``."""
    return torch.clamp((norm + 1e-6) / max_norm, min=1.0)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on linear weights only: never on norms, embeddings or biases."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad:
                (decay if isinstance(module, nn.Linear) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
