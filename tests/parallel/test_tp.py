"""Tensor parallel on real gloo processes (CPU, float32), against the single-process model.

Two launches do most of the work (starting processes costs seconds):
- 2 ranks: TP=2 for every model kind (losses and full gradients, several chunk sizes for the
  adaptive CAT), sequence parallel and loss parallel really in use, odd-length logits
  (uneven sequence shards), a clipped foreach-AdamW step, every activation-checkpointing
  mode against none, and train.py runs with tp=2;
- 4 ranks: FSDP x TP (2x2) for every kind and HSDP x TP (2x1x2), an AdamW step, and a
  train.py run with 2x2.
train.py runs are compared with single-process runs of the same config (metrics.jsonl).
Tolerances: 1e-5 on losses (~5) and gradients, 2e-5 on trained loss curves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..distributed import launch

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
# Adam's first step is lr * g / (|g| + eps): with the default eps a gradient of ~1e-8 that
# differs by float32 rounding moves a weight by up to lr. A large eps keeps the update
# proportional to the gradient, so the step comparison stays exact to TOL.
ADAM_EPS = 1e-3
CURVE_TOL = 2e-5

# name -> (preset, overrides). "cat" and "hybrid" add GQA and q/k norms (per-head norms are
# partial sums under TP); "cat_adaptive" runs every chunk size.
CASES = {
    "dense": ("debug-dense", {}),
    "cat": ("debug-cat", {"n_kv_heads": 2, "compressor_kv_heads": 2, "qk_norm": True}),
    "cat_adaptive": ("debug-cat-adaptive", {}),
    "hybrid": ("debug-hybrid", {"n_kv_heads": 2, "qk_norm": True}),
}
TRAIN_KINDS = {"cat_adaptive": "debug-cat-adaptive"}


def case_args(name):
    from cat_titan.models.registry import get_preset

    preset, over = CASES[name]
    return get_preset(preset).replace(**over)


def batch(args, B=4, L=64, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, args.vocab_size, (B, L + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def reference(args, x, y, sizes=None):
    """Single-process losses and gradients per chunk size, and one clipped AdamW step."""
    import torch

    from cat_titan.models.registry import build_model
    from cat_titan.parallel.parallelize import clip_grad_norm_, param_groups

    model = build_model(args, seed=0)
    out = {}
    for c in sizes or args.chunk_sizes or (None,):
        model.zero_grad()
        loss = model(x, y, chunk_size=c)
        loss.backward()
        out[c] = (loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()})
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, eps=ADAM_EPS, foreach=True)
    norm = clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    with torch.no_grad():
        logits = model(x[:, :37])  # odd length: uneven sequence shards under TP
    return out, norm.item(), {n: p.detach().clone() for n, p in model.named_parameters()}, logits


def named_params(model):
    """named_parameters without the activation-checkpoint wrapper's prefix."""
    return [(n.replace("_checkpoint_wrapped_module.", ""), p) for n, p in model.named_parameters()]


def full_grad(p):
    g = p.grad
    if g.placements != p.placements:  # partial sums (no FSDP to reduce them)
        g = g.redistribute(placements=p.placements)
    return g.full_tensor()


def check_parallel(args, pdims, x, y, ref, ac="none", probe=False, compile_=False, sp=True):
    """Build the parallel model, compare it with ``ref``; returns the largest differences.
    Compiled models skip the odd-length logits (one more graph: ~30 s of CPU compile)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    from cat_titan.models.registry import build_model
    from cat_titan.parallel.parallelize import clip_grad_norm_, loss_parallel_context, param_groups, parallelize

    (ref_steps, ref_norm, ref_params, ref_logits) = ref
    model = build_model(args, device="meta")
    parallelize(model, pdims, compile_=compile_, ac=ac, ac_every=2, param_dtype=torch.float32, use_fsdp=pdims.dp > 1,
                sequence_parallel=sp)
    model.to_empty(device="cpu")
    model.init_weights(seed=0, device="cpu")
    for n, p in model.named_parameters():  # every parameter a DTensor on its mesh
        fsdp_dims = (1 + (pdims.dp_replicate > 1)) if pdims.dp > 1 else 0
        assert isinstance(p, DTensor) and p.device_mesh.ndim == (pdims.tp > 1) + fsdp_dims, n

    seen = {}
    if probe:  # sequence parallel and loss parallel really in use
        def norm_in(mod, args):
            seen.setdefault("norm_in", args[0].placements)

        def logits_out(mod, args, out):
            seen.setdefault("logits", out.placements if isinstance(out, DTensor) else None)

        model.layers[0].attention_norm.register_forward_pre_hook(norm_in)
        model.head.output.register_forward_hook(logits_out)

    per = x.shape[0] // pdims.dp
    lo = pdims.dp_rank * per
    xs, ys = x[lo:lo + per], y[lo:lo + per]
    diffs = {"loss": 0.0, "grad": 0.0}
    grads = {}
    for c, (ref_loss, ref_grads) in ref_steps.items():
        model.zero_grad()
        with loss_parallel_context():
            loss = model(xs, ys, chunk_size=c)
            loss.backward()
        assert type(loss) is torch.Tensor
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        diffs["loss"] = max(diffs["loss"], abs(mean.item() / pdims.world - ref_loss))
        grads[c] = {n: full_grad(p) for n, p in named_params(model)}
        for n, g in grads[c].items():
            diffs["grad"] = max(diffs["grad"], (g - ref_grads[n]).abs().max().item())
    if probe:
        assert seen["norm_in"] == (Shard(1),), seen
        assert seen["logits"] in ((Shard(2),), (Shard(-1),)), seen

    # One clipped foreach-AdamW step, as the trainer takes it.
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, eps=ADAM_EPS, foreach=True)
    norm = clip_grad_norm_(model.parameters(), 0.5)
    opt.step()
    diffs["norm"] = abs(norm.item() - ref_norm)
    diffs["step"] = max((p.full_tensor() - ref_params[n]).abs().max().item() for n, p in named_params(model))
    diffs["logits"] = 0.0
    if not compile_:
        with torch.no_grad():
            logits = model(x[:, :37])
        assert type(logits) is torch.Tensor
        diffs["logits"] = (logits - ref_logits).abs().max().item()
    return diffs, grads


def train_overrides(run_dir, preset, extra=()):
    return [f"job.run_dir={run_dir}", f"model.preset={preset}", "training.steps=3", "data.seq_len=32",
            "training.global_batch=8", "training.micro_batch=2", "metrics.log_interval=1", "training.eval_batches=1",
            "training.sample_tokens=4", "checkpoint.save_final=false", "metrics.tensorboard=false",
            "data.corpus_max_bytes=300000", "optimizer.lr=3e-3", "schedule.warmup_steps=2", *extra]


def run_train(out_root, extra):
    from cat_titan.train.trainer import main

    for kind, preset in TRAIN_KINDS.items():
        rc = main(["--config", str(ROOT / "configs" / "debug_cat.yaml"),
                   *train_overrides(Path(out_root) / kind, preset, extra)])
        assert rc == 0, (kind, rc)


def run_tp2(rank, world, out_root):
    """2 ranks: TP=2 for every kind, AC modes under TP, FSDP + compile, train.py with tp=2."""
    import torch
    import torch.distributed as dist

    from cat_titan.parallel.mesh import build_parallel_dims

    pdims = build_parallel_dims(1, 1, 2, torch.device("cpu"))
    results = {}
    for name in CASES:
        args = case_args(name)
        x, y = batch(args)
        ref = reference(args, x, y)
        diffs, grads = check_parallel(args, pdims, x, y, ref, probe=True)
        results[name] = diffs
        if name in ("cat_adaptive", "hybrid"):  # activation checkpointing against none
            for ac in ("full", "every_n", "selective"):
                d, g = check_parallel(args, pdims, x, y, ref, ac=ac)
                results[f"{name}/ac={ac}"] = {
                    "loss": d["loss"],
                    "vs_none": max((g[c][n] - grads[c][n]).abs().max().item() for c in g for n in g[c])}
    # TP without sequence parallel (the compressor always runs so; here a whole decoder).
    args = case_args("hybrid")
    x, y = batch(args)
    results["hybrid/no_sp"] = check_parallel(args, pdims, x, y, reference(args, x, y), sp=False)[0]
    # CAT layers only, with a decoder head count TP does not divide: only the inner heads split
    args = case_args("hybrid").replace(layer_pattern=["cat"], n_heads=1, n_kv_heads=None)
    x, y = batch(args)
    results["cat_layers_only"] = check_parallel(args, pdims, x, y, reference(args, x, y))[0]
    # FSDP (no TP) with per-block compile, against eager (the cheapest model: CPU compiles slowly).
    args = case_args("dense")
    x, y = batch(args)
    results["fsdp2+compile/dense"] = check_parallel(args, build_parallel_dims(1, 2, 1, torch.device("cpu")), x, y,
                                                    reference(args, x, y), compile_=True)[0]
    dist.barrier()
    run_train(out_root, ["parallelism.tp=2"])
    return results


def run_tp4(rank, world, out_root):
    """4 ranks: FSDP x TP (2x2) for every kind, HSDP x TP (2x1x2), train.py with 2x2."""
    import torch

    from cat_titan.parallel.mesh import build_parallel_dims

    results = {}
    for layout, (rep, shard), names in [("fsdp2xtp2", (1, 2), list(CASES)), ("hsdp2x1xtp2", (2, 1), ["cat_adaptive"])]:
        pdims = build_parallel_dims(rep, shard, 2, torch.device("cpu"))
        for name in names:
            args = case_args(name)
            x, y = batch(args)
            ref = reference(args, x, y, sizes=(2, 8) if args.kind == "cat_adaptive" else None)
            results[f"{layout}/{name}"] = check_parallel(args, pdims, x, y, ref)[0]
    run_train(out_root, ["parallelism.tp=2", "parallelism.dp_shard=2"])
    return results


def run_single(rank, world, out_root):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    run_train(out_root, [])
    return True


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def evals(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [v for r in rows if r.get("eval") for k, v in sorted(r.items()) if k.startswith("val_loss")]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    os.environ["CAT_TITAN_CACHE"] = str(cache)
    yield {"CAT_TITAN_CACHE": str(cache)}


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache_env):
    out = tmp_path_factory.mktemp("single")
    launch(run_single, 1, str(out), env=cache_env)
    return out


@pytest.fixture(scope="module")
def tp2(tmp_path_factory, cache_env, single):
    out = tmp_path_factory.mktemp("tp2")
    return out, launch(run_tp2, 2, str(out), env=cache_env)[0]


@pytest.fixture(scope="module")
def tp4(tmp_path_factory, cache_env, single):
    out = tmp_path_factory.mktemp("tp4")
    return out, launch(run_tp4, 4, str(out), env=cache_env)[0]


def _assert_close(results, keys):
    for key in keys:
        d = results[key]
        for what in ("loss", "grad", "norm", "step", "logits"):
            assert d[what] < TOL, (key, what, d)


def test_tp2_losses_grads_step_equal_single_process(tp2):
    _, results = tp2
    _assert_close(results, [*CASES, "hybrid/no_sp", "cat_layers_only"])


def test_activation_checkpointing_modes_equal_none(tp2):
    _, results = tp2
    keys = [k for k in results if "/ac=" in k]
    assert len(keys) == 6
    for k in keys:
        assert results[k]["loss"] < TOL and results[k]["vs_none"] <= 1e-7, (k, results[k])


def test_fsdp_with_compile_matches_eager(tp2):
    _, results = tp2
    _assert_close(results, ["fsdp2+compile/dense"])


def test_fsdp_x_tp_and_hsdp_x_tp_equal_single_process(tp4):
    _, results = tp4
    assert len(results) == len(CASES) + 1
    _assert_close(results, list(results))


def test_train_py_tp2_and_fsdp_x_tp_match_single_process(single, tp2, tp4):
    for (out, _), same_eval_data in ((tp2, True), (tp4, False)):
        for kind in TRAIN_KINDS:
            a, b = losses(single / kind), losses(out / kind)
            assert len(a) == len(b) == 3
            assert max(abs(p - q) for p, q in zip(a, b)) < CURVE_TOL, (out.name, kind, a, b)
            ea, eb = evals(single / kind), evals(out / kind)
            assert len(ea) == len(eb) == 4, (ea, eb)  # one validation loss per chunk size
            if same_eval_data:  # validation batches depend on the data-parallel size
                assert max(abs(p - q) for p, q in zip(ea, eb)) < CURVE_TOL, (out.name, kind, ea, eb)


def test_compile_with_tp_on_cpu_is_refused_by_the_cli(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "never"
    base = ["--config", str(ROOT / "configs" / "debug_cat.yaml"), f"job.run_dir={run_dir}", "training.compile=true",
            "job.device=cpu", "training.micro_batch=4"]
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), *base, "parallelism.tp=2"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "WORLD_SIZE": "2"})
    assert out.returncode == 2, out.stderr
    assert "parallelism.tp=2 with training.compile=true is not supported on CPU" in out.stderr
    assert "set training.compile=false or parallelism.tp=1" in out.stderr
    # FSDP x TP and HSDP x TP, through the same entry point in-process.
    from cat_titan.train.trainer import main

    monkeypatch.setenv("WORLD_SIZE", "4")
    for extra in (["parallelism.dp_shard=2"], ["parallelism.dp_replicate=2"]):
        assert main([*base, "parallelism.tp=2", *extra]) == 2
        assert "is not supported on CPU" in capsys.readouterr().err
    assert not run_dir.exists()
