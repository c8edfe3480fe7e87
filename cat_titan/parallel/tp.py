"""Tensor-parallel plans, as data: one dict per submodule, composed per model kind.

Every plan maps a module path (relative to the module it is applied to) to a DTensor
``ParallelStyle``. ``model_plan`` composes them into one dict of full paths for
``parallelize_module``:

- ``attention_plan``: fused ``wqkv`` column-wise (its rows are stored per KV group, so a
  shard holds whole groups: heads split across ranks), ``wo`` row-wise;
- ``cat_attention_plan`` (the CAT layer): ``expand``/``compress`` column-wise with their
  outputs gathered (the inner attention needs every feature), inner ``wqkv`` column-wise,
  inner ``wo`` column-wise on the gathered heads, ``final_proj`` row-wise, so the CAT layer
  keeps one reduction on its (B, L, D) output like a plain attention;
- ``feed_forward_plan``: ``w1``/``w3`` column-wise, ``w2`` row-wise;
- ``block_plan``: the norms and the inputs of attention and MLP around the above;
- model level: token embeddings sharded by vocabulary (row-wise), the output projection
  sharded by vocabulary (column-wise) with a loss on the sharded logits (see
  ``loss_parallel_context``); the CAT glue (``cond``, ``separator``, the compressor's
  ``chunk_pos``/``size_tokens``/``proj_fx``/final norm) replicated.

Sequence parallel (``sp``) applies to decoder blocks (dense, CAT decoder, hybrid): the
residual stream between blocks is a DTensor sharded on the sequence (dim 1), norms run on
the shard, attention and MLP inputs are all-gathered and their outputs reduce-scattered.
The first block takes the full sequence and shards it; the last block gathers it again,
because the model code after the blocks (CAT ``out_index`` selection, the head) needs
whole sequences. Shards may be uneven (DTensor pads inside its collectives): any length
works, e.g. while sampling; CAT decoders are padded to a multiple of tp so that training
shards are even (see parallelize.py). The compressor's blocks run without sequence
parallel: their batch is (B*K chunks, prefix + c tokens) and changes with every chunk size.

Parameters that model code reads directly rather than through a module's forward (the CAT
glue, norm weights outside sequence-parallel regions, per-head q/k norms) are stored as
DTensors on the TP mesh (``LocalParams``) and read as local tensors inside the forward, so
model code stays single-device (STYLE 1-2) and every parameter is a DTensor.
"""

from __future__ import annotations

import contextlib

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput, RowwiseParallel,
                                               SequenceParallel, loss_parallel, parallelize_module)

Plan = dict[str, ParallelStyle]


# ---------------------------------------------------------------------------------------
# styles
# ---------------------------------------------------------------------------------------
def _sync_input_fn(input_layouts, desired_input_layouts, mod, inputs, device_mesh):
    x = inputs[0]
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, device_mesh, input_layouts, run_check=False)
    if input_layouts != desired_input_layouts:
        x = x.redistribute(placements=desired_input_layouts)
    return x


def _sync_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
    if outputs.placements != output_layouts:
        outputs = outputs.redistribute(placements=output_layouts)
    return outputs.to_local() if use_local_output else outputs


class Colwise(ColwiseParallel):
    """torch's ColwiseParallel with redistributions that complete before they return. torch's
    run asynchronously, and a compiled block then returns DTensors wrapping
    AsyncCollectiveTensors, which AOTAutograd's backward rejects ("Expected a
    AsyncCollectiveTensor tangent but got a plain Tensor"; torch 2.13, measured on CPU)."""

    _prepare_input_fn = staticmethod(_sync_input_fn)
    _prepare_output_fn = staticmethod(_sync_output_fn)


class Rowwise(RowwiseParallel):
    """torch's RowwiseParallel with synchronous redistributions (see ``Colwise``)."""

    _prepare_input_fn = staticmethod(_sync_input_fn)
    _prepare_output_fn = staticmethod(_sync_output_fn)


_LOCAL_CLASSES: dict[tuple, type] = {}


def _local_class(cls: type, names: tuple[str, ...], partial_grads: bool) -> type:
    """A subclass of ``cls`` whose parameters ``names`` read as local tensors while they live
    on the 1-D TP mesh (plain TP, or FSDP's unsharded copy during forward/backward). Sharded
    FSDP copies (2-D/3-D meshes) read as they are, so initialisation sees DTensors."""
    key = (cls, names, partial_grads)
    if key not in _LOCAL_CLASSES:
        grad = (Partial(),) if partial_grads else None

        def view(name):
            def get(self):
                p = self._parameters[name]
                if isinstance(p, DTensor) and len(p.placements) == 1:
                    return p.to_local(grad_placements=grad)
                return p

            return property(get)

        _LOCAL_CLASSES[key] = type(f"TPLocal{cls.__name__}", (cls,), {n: view(n) for n in names})
    return _LOCAL_CLASSES[key]


class LocalParams(ParallelStyle):
    """The module's own parameters become replicated DTensors on the TP mesh, but model code
    reading ``module.weight`` inside a forward gets the local tensor (the class gains a
    property per parameter); its gradient flows back to the DTensor.

    ``partial_grads``: each rank's computation covers only part of the parameter's uses
    (a q/k norm applied to this rank's heads), so the local gradient is a partial sum that
    is reduced across ranks. Otherwise each rank computes the same full gradient (the
    replicated computation sees full, identical upstream gradients: every TP region's input
    gradient is all-reduced or gathered on its way out). State-dict keys do not change.
    """

    def __init__(self, partial_grads: bool = False):
        super().__init__()
        self.partial_grads = partial_grads

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        names = tuple(n for n, _ in module.named_parameters(recurse=False))
        for name in names:
            p = module._parameters[name]
            dp = distribute_tensor(p.data, device_mesh, [Replicate()])  # rank 0's values, as torch's styles
            module.register_parameter(name, nn.Parameter(dp, requires_grad=p.requires_grad))
        module.__class__ = _local_class(module.__class__, names, self.partial_grads)
        return module


class SequenceParallelNorm(SequenceParallel):
    """torch's SequenceParallel for RMSNorm: the norm runs on DTensors sharded on the sequence;
    liger's fused RMSNorm takes plain tensors only, so these norms use the plain path
    (inductor fuses it under compile). Its input is the residual stream, a DTensor."""

    @staticmethod
    def _prepare_input_fn(sequence_sharding, mod, inputs, device_mesh):
        x = inputs[0]
        if not isinstance(x, DTensor):
            raise TypeError(f"a sequence-parallel norm expects a DTensor input, got {type(x).__name__}")
        return x if x.placements == sequence_sharding else x.redistribute(placements=sequence_sharding)

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.fused = False
        return super()._apply(module, device_mesh)


_LOSS_PARALLEL = [0]  # > 0 inside loss_parallel_context


@contextlib.contextmanager
def loss_parallel_context():
    """Wrap forward *and* backward of a training micro-step: inside, a tensor-parallel
    model's head keeps the logits sharded by vocabulary and computes the cross-entropy on the
    shards (torch's ``loss_parallel``). Models without TP compute on plain tensors and are
    unaffected. Outside it (evaluation, sampling) the logits are gathered."""
    with loss_parallel():
        _LOSS_PARALLEL[0] += 1
        try:
            yield
        finally:
            _LOSS_PARALLEL[0] -= 1


class VocabParallelOutput(Colwise):
    """The vocabulary projection, sharded by vocabulary rows. Its logits stay sharded inside
    ``loss_parallel_context``; elsewhere they are gathered into a plain tensor."""

    def __init__(self):
        super().__init__(output_layouts=Shard(-1), use_local_output=False)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if _LOSS_PARALLEL[0]:
            return outputs  # DTensor, Shard(-1) on the vocabulary
        return outputs.redistribute(placements=[Replicate()]).to_local()


class LocalOutput(ParallelStyle):
    """Return plain tensors from a module (the head's loss is a replicated DTensor under loss
    parallel; vocabulary-sharded logits are gathered). Views of DTensor storage are copied:
    the head's output is the model's, and FSDP warns about a root returning a view."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def hook(mod, inputs, output):
            if isinstance(output, DTensor):
                output = output.redistribute(placements=[Replicate()] * output.device_mesh.ndim).to_local()
            return output.clone() if output._is_view() else output

        module.register_forward_hook(hook)
        return module


class SequenceBoundary(ParallelStyle):
    """The ends of a sequence-parallel stack of blocks. ``enter``: the block's first input,
    a full (B, S, D) tensor, becomes a DTensor sharded on the sequence (a local slice, no
    communication; a DTensor input keeps its placement). ``leave``: the block's output is
    gathered into a plain full tensor: a fresh one, since FSDP warns about blocks that
    return views."""

    def __init__(self, enter: bool = False, leave: bool = False):
        super().__init__()
        self.enter, self.leave = enter, leave

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if self.enter:
            def shard(mod, args):
                x = args[0]
                if not isinstance(x, DTensor):
                    x = DTensor.from_local(x, device_mesh, [Replicate()], run_check=False)
                return (x.redistribute(placements=[Shard(1)]), *args[1:])

            module.register_forward_pre_hook(shard)
        if self.leave:
            def gather(mod, args, output):
                return output.redistribute(placements=[Replicate()]).to_local().clone()

            module.register_forward_hook(gather)
        return module


# ---------------------------------------------------------------------------------------
# plans
# ---------------------------------------------------------------------------------------
def nest(prefix: str, plan: Plan) -> Plan:
    return {f"{prefix}.{k}": v for k, v in plan.items()}


def _rowwise_out(sp: bool) -> Rowwise:
    """Row-wise output: reduce-scattered on the sequence (sp) or all-reduced."""
    return Rowwise(output_layouts=Shard(1), use_local_output=False) if sp else Rowwise()


def attention_plan(sp: bool, qk_norm: bool) -> Plan:
    plan: Plan = {"wqkv": Colwise(), "wo": _rowwise_out(sp)}
    if qk_norm:  # per-head norms see this rank's heads only
        plan |= {"q_norm": LocalParams(partial_grads=True), "k_norm": LocalParams(partial_grads=True)}
    return plan


def cat_attention_plan(sp: bool, qk_norm: bool) -> Plan:
    """CatAttention: h = [cond | compress(chunks) | expand(x) | pad] (B, S, Dfx) is built from
    gathered projections (every rank holds all of h), the inner attention splits heads, its
    ``wo`` gathers the heads and shards its output features, and ``final_proj`` (row-wise on
    those features) reduces once, after the out_index selection."""
    return {"expand": Colwise(output_layouts=Replicate()),
            "compress": Colwise(output_layouts=Replicate()),
            "cond": LocalParams(),
            "inner.wqkv": Colwise(),
            "inner.wo": Colwise(input_layouts=Shard(-1)),
            "final_proj": _rowwise_out(sp),
            **(nest("inner", {"q_norm": LocalParams(partial_grads=True), "k_norm": LocalParams(partial_grads=True)})
               if qk_norm else {})}


def feed_forward_plan(sp: bool) -> Plan:
    return {"w1": Colwise(), "w3": Colwise(), "w2": _rowwise_out(sp)}


def block_plan(sp: bool, attention: Plan) -> Plan:
    """A pre-norm block around an attention plan. Attention and MLP take their input as one
    replicated DTensor, so the gradients of their several column-wise consumers are summed
    before a single reduction (all-reduce, or reduce-scatter under sp)."""
    seq = Shard(1) if sp else Replicate()
    norm = SequenceParallelNorm() if sp else LocalParams()
    return {"attention_norm": norm,
            "attention": PrepareModuleInput(input_layouts=(seq, None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            **nest("attention", attention),
            "ffn_norm": SequenceParallelNorm() if sp else LocalParams(),
            "feed_forward": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            **nest("feed_forward", feed_forward_plan(sp))}


def blocks_plan(kinds: list[str], sp: bool, qk_norm: bool) -> Plan:
    """Per-index plans for a stack of blocks ("dense" or "cat" attention). Under sp the first
    block shards the sequence of its (full) input and the last block gathers its output."""
    plan: Plan = {}
    for i, kind in enumerate(kinds):
        attn = cat_attention_plan(sp, qk_norm) if kind == "cat" else attention_plan(sp, qk_norm)
        plan |= nest(str(i), block_plan(sp, attn))
    if sp and kinds:
        last = len(kinds) - 1
        plan["0"] = SequenceBoundary(enter=True, leave=last == 0)
        if last:
            plan[str(last)] = SequenceBoundary(leave=True)
    return plan


def model_plan(model: nn.Module, sp: bool = True) -> Plan:
    """The whole model's plan, composed from the per-submodule plans above."""
    args = model.args
    kinds = args.layer_kinds()
    is_cat = args.kind in ("cat", "cat_adaptive")
    # dense / cat_layer: the embedding feeds the blocks, so under sp it can reduce-scatter
    # straight onto the sequence shards; the CAT decoder concatenates it with the prefix.
    feeds_blocks = sp and not is_cat
    plan: Plan = {
        "tok_embeddings": Rowwise(input_layouts=Replicate(), output_layouts=Shard(1) if feeds_blocks else Replicate(),
                                  use_local_output=not feeds_blocks),
        **nest("layers", blocks_plan(kinds, sp, args.qk_norm)),
        "head": LocalOutput(),
        "head.norm": LocalParams(),
        "head.output": VocabParallelOutput(),
    }
    if is_cat:
        plan["cond"] = LocalParams()
        if args.kind == "cat_adaptive":
            plan["separator"] = LocalParams()
        compressor: Plan = {
            "tok_embeddings": Rowwise(input_layouts=Replicate(), output_layouts=Replicate()),
            "chunk_pos": LocalParams(),
            **nest("layers", blocks_plan(["dense"] * args.compressor_layers, False, args.qk_norm)),
            "norm": LocalParams(),
            # Replicated: proj_weight() reads it directly (and resizes it for adaptive CATs).
            "proj_fx": LocalParams(),
        }
        if args.kind == "cat_adaptive":
            compressor["size_tokens"] = LocalParams()
        plan |= nest("compressor", compressor)
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = True) -> None:
    """Apply ``model_plan`` in place; afterwards every parameter is a DTensor on ``tp_mesh``."""
    parallelize_module(model, tp_mesh, model_plan(model, sequence_parallel))
    # liger's fused linear cross-entropy needs the whole vocabulary weight; under TP the
    # head computes vocabulary-sharded logits and the loss-parallel cross-entropy instead.
    model.head.fused = False
    plain = [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]
    if plain:
        raise RuntimeError(f"tensor parallel left parameters without a placement: {plain}")
