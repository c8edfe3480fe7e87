"""FSDP's default resharding: blocks re-gather their weights in backward only where there is
something to gather. With one shard rank (plain FSDP on one rank, or HSDP of replicas of one
shard) the "all-gather" is a copy and a cast, so every block keeps its weights from forward
to backward; with two shard ranks every block but the last reshards. 2 gloo processes."""

import torch

from ..distributed import launch


def body(rank, world, replicate, shard):
    from cat_titan.models.registry import build_model, get_preset
    from cat_titan.parallel.mesh import build_parallel_dims
    from cat_titan.parallel.parallelize import apply_fsdp

    pdims = build_parallel_dims(replicate, shard, 1, torch.device("cpu"))
    model = build_model(get_preset("debug-dense"), device="meta")
    apply_fsdp(model, pdims, torch.float32)
    # FSDP2 keeps a post-forward mesh only for modules that reshard after forward
    return [block._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None
            for block in model.layers]


def test_replicas_of_one_shard_keep_weights_gathered_and_two_shards_reshard():
    hsdp = launch(body, 2, 2, 1)  # 2 replicas x 1 shard
    assert hsdp == [[False, False], [False, False]]
    fsdp = launch(body, 2, 1, 2)  # 2 shards: all but the last block reshard
    assert fsdp == [[True, False], [True, False]]
