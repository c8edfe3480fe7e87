"""Non-finite steps on real gloo processes: a NaN produced inside the model at one step makes
the real backward, clipping and AdamW see a NaN gradient norm. Under ``training.nonfinite``
skip the update is not applied (weights and optimizer state bit-equal to before the step)
and training continues; under stop the trainer raises, naming the step, with the weights of
the last good step. Both for the fused optimizer, which skips on the device without a host
sync (``found_inf``) and reports at the next check, and for the foreach optimizer, which
checks on the host in the step. World 1 (plain module) and 2 (FSDP, DTensor parameters).
"""

import pytest

from ..distributed import launch
from . import debug_cat_config

BAD_STEP = 3  # 1-based: the third optimizer step sees the NaN


def full_state(trainer):
    import torch
    from torch.distributed.tensor import DTensor

    def full(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()

    params = {n: full(p) for n, p in trainer.model.named_parameters()}
    steps = [full(s["step"]) for s in trainer.optimizer.state.values()]
    moments = [full(s["exp_avg"]) for s in trainer.optimizer.state.values()]
    return params, torch.stack(steps), moments


def same(a, b) -> bool:
    import torch

    return all(torch.equal(x, y) for x, y in zip(a[0].values(), b[0].values())) and torch.equal(a[1], b[1]) \
        and all(torch.equal(x, y) for x, y in zip(a[2], b[2]))


def body(rank, world, run_root):
    import torch.distributed as dist

    from cat_titan.train.trainer import NonFiniteError, Trainer, preflight

    dist.init_process_group("gloo")
    results = {}
    for impl in ("fused", "foreach"):
        for policy in ("skip", "stop"):
            cfg = debug_cat_config(f"{run_root}/{impl}-{policy}", 6, f"optimizer.implementation={impl}",
                                   f"training.nonfinite={policy}")
            device, _ = preflight(cfg)
            trainer = Trainer(cfg, device, None)
            poison = trainer.model.layers[0]
            poison.register_forward_hook(
                lambda m, i, out, tr=trainer: out * float("nan") if tr.state.step == BAD_STEP - 1 else out)
            for _ in range(BAD_STEP - 1):
                trainer.train_step()
            assert trainer.check_nonfinite() == 0
            before = full_state(trainer)
            try:
                trainer.train_step()
                raised_in_step = None
            except NonFiniteError as e:
                raised_in_step = str(e)
            after = full_state(trainer)
            r = {"untouched": same(before, after), "raised_in_step": raised_in_step}
            if raised_in_step is None:
                try:
                    r["skipped"] = trainer.check_nonfinite()
                except NonFiniteError as e:
                    r["raised_at_check"] = str(e)
                if policy == "skip":
                    trainer.train_step()  # training goes on and changes the weights again
                    r["moves_after"] = not same(after, full_state(trainer))
                    r["skipped_later"] = trainer.check_nonfinite()
            results[(impl, policy)] = r
            trainer.checkpointer.close()
            trainer.metrics.close()
    return results


@pytest.mark.parametrize("world", [1, 2])
def test_nonfinite_step_is_skipped_or_stops(world, tmp_path, monkeypatch):
    monkeypatch.setenv("CAT_TITAN_CACHE", str(tmp_path / "cache"))
    res = launch(body, world, str(tmp_path), env={"CAT_TITAN_CACHE": str(tmp_path / "cache")})
    for r in res:
        for impl in ("fused", "foreach"):
            skip, stop = r[(impl, "skip")], r[(impl, "stop")]
            assert skip["untouched"], (impl, skip)
            assert skip["raised_in_step"] is None
            assert skip["skipped"] == 1 and skip["moves_after"] and skip["skipped_later"] == 0, (impl, skip)
            assert stop["untouched"], (impl, stop)
            message = stop["raised_in_step"] if impl == "foreach" else stop["raised_at_check"]
            assert f"at step {BAD_STEP}" in message and "nonfinite=skip" in message, (impl, stop)


def pending_body(rank, world, run_dir):
    import torch.distributed as dist

    from cat_titan.train.checkpoint import complete_steps
    from cat_titan.train.trainer import NonFiniteError, Trainer, preflight

    dist.init_process_group("gloo")
    cfg = debug_cat_config(run_dir, 8, "checkpoint.interval=2", "checkpoint.async_save=true",
                           "optimizer.implementation=foreach", "training.nonfinite=stop")
    device, _ = preflight(cfg)
    trainer = Trainer(cfg, device, None)
    trainer.model.layers[0].register_forward_hook(
        lambda m, i, out, tr=trainer: out * float("nan") if tr.state.step == BAD_STEP - 1 else out)
    try:
        trainer.run()
        return "no error"
    except NonFiniteError:
        return [s for s, _ in complete_steps(run_dir)]


def test_a_stop_on_a_nonfinite_loss_finishes_the_pending_async_save(tmp_path):
    """Step 2's checkpoint is saved in the background when step 3 diverges: the run stops
    (exit 3 from train.py) after marking it complete, so a resubmission resumes from step 2
    (before, its shards were written but it was never marked: the next run started at step 0)."""
    res = launch(pending_body, 2, str(tmp_path / "run"), env={"CAT_TITAN_CACHE": str(tmp_path / "cache")})
    assert res == [[2], [2]]
