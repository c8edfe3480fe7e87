"""Gradient clipping on the fused AdamW path: the trainer does not rescale the gradients
itself but hands the kernel ``grad_scale`` = max(1, norm / max_norm), which it divides by
as it reads each gradient. Checked on real gloo processes, world 1 (plain module) and 2
(FSDP, DTensor parameters), against the foreach optimizer, which clips in place first.
float32; tolerance 2e-6 on the weights after three steps (the two optimizers differ by
rounding only; observed ~1e-7), while an unclipped run moves them by far more."""

import pytest

from ..distributed import launch
from . import debug_cat_config


def body(rank, world, run_root):
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from cat_titan.train.trainer import Trainer, preflight

    dist.init_process_group("gloo")
    weights, norms, scales = {}, {}, {}
    for impl, clip in (("fused", 0.05), ("foreach", 0.05), ("fused", 0.0)):
        cfg = debug_cat_config(f"{run_root}/{impl}-{clip}", 3, f"optimizer.implementation={impl}",
                               f"training.grad_clip={clip}")
        device, _ = preflight(cfg)
        trainer = Trainer(cfg, device, None)
        seen = []
        for _ in range(3):
            seen.append(float(trainer.train_step()["grad_norm"]))
        scales[(impl, clip)] = getattr(trainer.optimizer, "grad_scale", None)
        norms[(impl, clip)] = seen
        weights[(impl, clip)] = torch.cat([
            (p.full_tensor() if isinstance(p, DTensor) else p).detach().flatten() for p in trainer.model.parameters()])
        trainer.checkpointer.close()
        trainer.metrics.close()
    fused, foreach, unclipped = weights[("fused", 0.05)], weights[("foreach", 0.05)], weights[("fused", 0.0)]
    return {"norms": norms, "clip_vs_foreach": float((fused - foreach).abs().max()),
            "clip_vs_unclipped": float((fused - unclipped).abs().max()),
            "unclipped_scale_is_none": scales[("fused", 0.0)] is None}


@pytest.mark.parametrize("world", [1, 2])
def test_fused_adamw_clips_through_grad_scale(world, tmp_path):
    res = launch(body, world, str(tmp_path), env={"CAT_TITAN_CACHE": str(tmp_path / "cache")})
    for r in res:
        norms = r["norms"][("fused", 0.05)]
        assert all(n > 0.05 for n in norms), norms  # clipping was engaged at every step
        assert r["norms"][("foreach", 0.05)] == pytest.approx(norms, rel=1e-5)
        assert r["clip_vs_foreach"] < 2e-6, r
        assert r["clip_vs_unclipped"] > 1e-4, r
        assert r["unclipped_scale_is_none"]
