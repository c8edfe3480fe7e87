"""Single-process checks of the wrappers parallelize() applies: in-place compile keeps
state-dict keys, the recompile limit covers every adaptive chunk size, and op-level
selective checkpointing saves matmul/attention outputs and recomputes the rest.
(Numerical equality of every AC mode, and compile under FSDP, run on gloo in test_tp.py.)"""

from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from cat_titan.models.registry import build_model, get_preset
from cat_titan.parallel.parallelize import (apply_ac, apply_compile, recompile_limit, refuse_unsupported,
                                             static_shapes)

DEBUG = ["debug-dense", "debug-cat", "debug-cat-adaptive", "debug-hybrid"]


@pytest.mark.parametrize("ac", ["none", "full", "every_n", "selective"])
def test_compile_in_place_keeps_state_dict_keys(ac):
    from torch._dynamo import config as dynamo_config

    with dynamo_config.patch(recompile_limit=8):  # apply_compile raises the global limit
        for name in DEBUG:
            model = build_model(get_preset(name), device="meta")
            keys = list(model.state_dict())
            apply_ac(model, ac, 2)
            apply_compile(model)
            assert list(model.state_dict()) == keys, name
            assert not any("_orig_mod" in k for k in model.state_dict())
            assert dynamo_config.recompile_limit >= recompile_limit(model) > 8
    adaptive = build_model(get_preset("debug-cat-adaptive"), device="meta")
    apply_ac(adaptive, "every_n", 2)  # wrapped and plain blocks: more kinds of block
    # one graph per chunk size (1, 2, 4, 8), per grad mode, per kind of block
    assert recompile_limit(adaptive) >= 4 * 2 * 3


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _counts(name, ac):
    model = build_model(get_preset(name), seed=0)
    apply_ac(model, ac, 2)
    x = torch.randint(0, 256, (1, 16))
    with OpCounter() as counter:
        model(x, x).backward()
    return counter.counts


@pytest.mark.parametrize("name", ["debug-cat", "debug-hybrid"])
def test_selective_checkpointing_saves_matmuls_and_attention(name):
    none, full, sel = (_counts(name, ac) for ac in ("none", "full", "selective"))
    attn = "_scaled_dot_product_flash_attention_for_cpu"
    assert none[attn] > 0
    # full recomputes whole blocks: matmuls and attention run again in backward
    assert full["mm"] > none["mm"] and full[attn] > none[attn]
    # selective keeps them: the same matmuls and attention calls as without checkpointing ...
    assert sel["mm"] == none["mm"] and sel[attn] == none[attn]
    # ... and recomputes the cheap ops (RMSNorm's rsqrt, SwiGLU's silu)
    assert sel["rsqrt"] > none["rsqrt"] and sel["silu"] > none["silu"]


def test_refusals():
    msg = refuse_unsupported("cpu", 2, True)
    assert "parallelism.tp=2 with training.compile=true is not supported on CPU" in msg
    assert refuse_unsupported("cpu", 2, False) is None
    assert refuse_unsupported("cpu", 1, True) is None
    assert refuse_unsupported("cuda", 2, True) is None  # measured to match FSDP on 2 H200s
    for ac in ("full", "every_n", "selective"):  # measured to crash or train wrongly on H200 and CPU
        msg = refuse_unsupported("cuda", 2, True, ac)
        assert f"activation_checkpoint={ac}" in msg and "activation_checkpoint=none" in msg
        assert refuse_unsupported("cuda", 2, False, ac) is None  # eager TP + AC is exact (test_tp.py)
        assert refuse_unsupported("cuda", 1, True, ac) is None


def test_adaptive_cat_compiles_one_graph_per_chunk_size_once():
    """The trainer's compile setting for adaptive CATs: a static graph per chunk size and
    block kind, compiled at the first use of that size and never again (~30 s on CPU)."""
    from torch._dynamo.utils import counters

    model = build_model(get_preset("debug-cat-adaptive"), seed=0)
    assert static_shapes(model, tp=1) and not static_shapes(build_model(get_preset("debug-cat"), device="meta"), 1)
    torch._dynamo.reset()
    counters.clear()
    apply_compile(model, dynamic=False if static_shapes(model, 1) else None)
    x = torch.randint(0, 256, (2, 64))
    graphs = []
    for c in (2, 8, 4, 2, 8, 4):
        model(x, x, chunk_size=c).backward()
        graphs.append(counters["stats"]["unique_graphs"])
    # 2 block kinds (decoder, compressor) x 3 chunk sizes, each compiled at its first use
    # (a dynamic graph would have served the third size without compiling: 2, 4, 4, ...)
    assert graphs == [2, 4, 6, 6, 6, 6], graphs


def _fsdp_units(rank, world):
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from cat_titan.parallel.mesh import build_parallel_dims
    from cat_titan.parallel.parallelize import parallelize

    dist.init_process_group("gloo")
    model = build_model(get_preset("debug-cat"), device="meta")
    parallelize(model, build_parallel_dims(1, world, 1, torch.device("cpu")), compile_=False, ac="none", ac_every=2,
                param_dtype=torch.float32, use_fsdp=True)
    units = [model.tok_embeddings, model.compressor.tok_embeddings, model.head, model, *model.layers,
             *model.compressor.layers]
    return all(isinstance(m, FSDPModule) for m in units)


def test_fsdp_units_embeddings_and_head_separately():
    """Embeddings and the output head are FSDP units of their own (their all-gather and
    reduce-scatter overlap with the blocks' compute instead of the root's)."""
    from ..distributed import launch

    assert launch(_fsdp_units, 2) == [True, True]
