"""Export: a 2-rank FSDP checkpoint -> one safetensors file on CPU without a process group ->
``cat_titan.load_pretrained`` reproduces the logits the training processes computed at the
end, bit for bit (float32, one thread); the reference format reads back through the parity
tool's loader; ``checkpoint.init_from`` starts new runs from a DCP checkpoint or an exported
file with exactly those weights; bad inputs give errors that name the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .distributed import launch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "debug_cat.yaml")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
KINDS = {"cat_adaptive": "debug-cat-adaptive", "dense": "debug-dense"}
BASE = ["data.seq_len=64", "training.global_batch=8", "training.micro_batch=4", "metrics.log_interval=1",
        "training.eval_batches=1", "training.sample_tokens=0", "metrics.tensorboard=false",
        "data.corpus_max_bytes=300000", "optimizer.lr=3e-3", "schedule.warmup_steps=2", "training.steps=3"]


def probe_tokens() -> torch.Tensor:
    return torch.randint(0, 257, (2, 64), generator=torch.Generator().manual_seed(7))


def run_train_then_init_from(rank, world, root):
    """Train each kind on 2 ranks (FSDP) and keep the final logits; then start new runs from
    its DCP checkpoint and from its exported file with lr=0 (one step leaves the weights)."""
    import torch.distributed as dist

    from cat_titan.config import load_config
    from cat_titan.export import export
    from cat_titan.train.trainer import Trainer, main, preflight

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    root = Path(root)
    logits = {}
    for kind, preset in KINDS.items():
        run = root / kind
        cfg = load_config(CONFIG, [f"job.run_dir={run}", f"model.preset={preset}", *BASE])
        trainer = Trainer(cfg, *preflight(cfg))
        assert trainer.run() == 0
        trainer.model.eval()
        with torch.no_grad():
            logits[kind] = {c: trainer.model(probe_tokens(), chunk_size=c)
                            for c in (trainer.model_args.chunk_sizes[:2] or [None])}
        if rank == 0:
            export(run, root / f"{kind}.safetensors")  # no process group involved
        dist.barrier()
        for name, src in (("init_dcp", run), ("init_file", root / f"{kind}.safetensors")):
            rc = main(["--config", CONFIG, f"job.run_dir={root / name / kind}", f"model.preset={preset}", *BASE,
                       "training.steps=1", "optimizer.lr=0", f"checkpoint.init_from={src}"])
            assert rc == 0, (kind, name)
    dist.destroy_process_group()
    return logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAT_TITAN_CACHE", str(tmp_path_factory.mktemp("cache")))
        logits = launch(run_train_then_init_from, 2, str(root))[0]
    return root, logits


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the training processes: bit-identical float32 sums
    yield
    torch.set_num_threads(before)


def forward(model, x, c):
    with torch.no_grad():
        return model(x, chunk_size=c)


@pytest.mark.parametrize("kind", KINDS)
def test_export_round_trip_reproduces_training_logits(trained, tmp_path, one_thread, kind):
    from safetensors import safe_open

    import cat_titan
    from cat_titan.export import export

    root, logits = trained
    out = tmp_path / "model.safetensors"
    info = export(root / kind, out)  # a run directory: its newest complete checkpoint
    assert info["step"] == 3 and info["source"].endswith("checkpoints/step-3")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert not any("optim" in k for k in f.keys())
    assert meta["format"] == "cat_titan" and meta["tokenizer"] == "byte" and meta["step"] == "3"
    assert json.loads(meta["model_args"])["kind"] == kind
    model = cat_titan.load_pretrained(out)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    for c, want in logits[kind].items():
        assert torch.equal(forward(model, probe_tokens(), c), want), (kind, c)

    # bf16 keeps the values rounded once, and loads as bf16
    export(root / kind / "checkpoints" / "step-3", out, dtype="bf16")
    half = cat_titan.load_pretrained(out)
    assert next(half.parameters()).dtype == torch.bfloat16
    for (name, p), q in zip(model.named_parameters(), half.parameters()):
        assert torch.equal(p.to(torch.bfloat16), q), name


def test_a_file_trained_with_gpu_runtime_settings_loads_for_this_device(trained, tmp_path, one_thread):
    """model_args records how the training machine ran the model (flex attention, liger fused
    ops); a CPU loads the same weights with its own choices and computes the same logits."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    import cat_titan
    from cat_titan.export import export

    root, logits = trained
    plain, gpu = tmp_path / "plain.safetensors", tmp_path / "gpu.safetensors"
    export(root / "cat_adaptive", plain)
    with safe_open(str(plain), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    args = json.loads(meta["model_args"])
    meta["model_args"] = json.dumps({**args, "attn_backend": "flex", "fused_ops": "on"})
    save_file(tensors, str(gpu), metadata=meta)
    model = cat_titan.load_pretrained(gpu)
    assert (model.args.attn_backend, model.args.fused_ops) == ("sdpa", "off")  # this CPU's choices
    for c, want in logits["cat_adaptive"].items():
        assert torch.equal(forward(model, probe_tokens(), c), want), c


@pytest.mark.parametrize("kind", KINDS)
def test_reference_format_reads_back_through_the_parity_loader(trained, tmp_path, one_thread, kind):
    import cat_titan
    from cat_titan.export import export, load_checkpoint_weights
    from cat_titan.parity import load_reference_file

    root, logits = trained
    out = tmp_path / "reference.safetensors"
    if kind == "dense":  # the command line once
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), str(root / kind), str(out),
                               "--format", "reference"], capture_output=True, text=True, timeout=120, env=ENV)
        assert done.returncode == 0, done.stderr
        assert "exported step 3" in done.stdout and "reference format" in done.stdout
    else:
        export(root / kind, out, fmt="reference")
    ref_kind, args, sd, others = load_reference_file(out)
    assert ref_kind == kind and not others
    _, native, _ = load_checkpoint_weights(root / kind)
    assert sd.keys() == native.keys() and all(torch.equal(sd[k], native[k]) for k in sd)
    model = cat_titan.load_pretrained(out)
    for c, want in logits[kind].items():
        assert torch.equal(forward(model, probe_tokens(), c), want), (kind, c)


def test_init_from_checkpoint_or_file_starts_a_new_run_with_those_weights(trained):
    from cat_titan.export import load_checkpoint_weights

    root, _ = trained
    for kind in KINDS:
        _, original, _ = load_checkpoint_weights(root / kind)
        for name in ("init_dcp", "init_file"):
            _, sd, meta = load_checkpoint_weights(root / name / kind)
            assert meta["step"] == 1  # a new run: counters, optimizer and data start afresh
            assert all(torch.equal(sd[k], original[k]) for k in original), (kind, name)


def test_bad_sources_are_refused_with_the_file_named(trained, tmp_path):
    import cat_titan
    from cat_titan.export import ExportError, export

    root, _ = trained
    with pytest.raises(ExportError, match="has no complete checkpoint"):
        (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
        export(tmp_path / "empty", tmp_path / "x.safetensors")
    with pytest.raises(ExportError, match="no such run or checkpoint directory"):
        export(tmp_path / "nowhere", tmp_path / "x.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    with pytest.raises(ExportError, match="bad.safetensors is not a readable safetensors file"):
        cat_titan.load_pretrained(bad)
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "export.py"), str(tmp_path / "nowhere"),
                           str(tmp_path / "x.safetensors")], capture_output=True, text=True, timeout=120, env=ENV)
    assert done.returncode == 2 and "error:" in done.stderr and "nowhere" in done.stderr
    assert not (tmp_path / "x.safetensors").exists()


def export_cli(*args, umask=0o022):
    # the shell sets the umask: preexec_fn is unsafe in a process with threads (torch's)
    return subprocess.run(["sh", "-c", f'umask {umask:o} && exec "$@"', "sh", sys.executable,
                           str(ROOT / "tools" / "export.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=ENV)


def test_exported_file_mode_follows_the_umask(trained, tmp_path):
    """Teammates on shared storage read exports as they read checkpoints (safetensors alone
    would create the file 0600)."""
    root, _ = trained
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        out = tmp_path / f"{umask:o}.safetensors"
        done = export_cli(root / "dense", out, umask=umask)
        assert done.returncode == 0, done.stderr
        assert out.stat().st_mode & 0o777 == mode, (oct(umask), oct(out.stat().st_mode))


def test_export_sources_are_told_apart(trained, tmp_path):
    """The checkpoints/ folder means its run; a plain directory and an exported file get their
    own messages; a skipped incomplete checkpoint is a one-line note, a warning for callers."""
    import shutil

    from cat_titan.export import export

    root, _ = trained
    out = tmp_path / "out.safetensors"
    done = export_cli(root / "dense" / "checkpoints", out)
    assert done.returncode == 0 and "exported step 3" in done.stdout, done.stderr
    (tmp_path / "plain").mkdir()
    for src, message in ((tmp_path / "plain", "plain is neither a run directory (it has no checkpoints/ folder) "
                                              "nor a checkpoint directory"),
                         (out, "out.safetensors is an exported weights file, not a checkpoint")):
        done = export_cli(src, tmp_path / "x.safetensors")
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "COMPLETE marker" not in done.stderr
    run = tmp_path / "run"
    shutil.copytree(root / "dense", run)
    (run / "checkpoints" / "step-9").mkdir()  # a save that was interrupted
    done = export_cli(run, out)
    assert done.returncode == 0, done.stderr
    assert done.stderr == (f"note: skipping incomplete checkpoint {run / 'checkpoints' / 'step-9'} (no COMPLETE "
                           f"marker: its save was interrupted); it is replaced or removed by the next save\n")
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        assert export(run, out)["step"] == 3
