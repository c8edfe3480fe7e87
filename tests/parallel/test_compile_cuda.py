"""On CUDA: the trainer's compiled adaptive CAT builds one graph per chunk size and block
kind, each once, and a steady run under the random curriculum compiles nothing more and
has no step several times slower than the median (a recompile or a stall would be one);
one GPU's two bf16 modes (FSDP mixed precision, and autocast without FSDP, the default)
train every model kind to the same losses. Runs the real Trainer (bf16, compiled blocks,
FlexAttention, liger's fused ops and loss)."""

import statistics
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]


def cuda_trainer(config: str, run_dir: Path, *overrides: str):
    """The real Trainer on the GPU for a debug config: batch 8 of 256 tokens, nothing saved."""
    from cat_titan.config import load_config
    from cat_titan.train.trainer import Trainer, preflight

    cfg = load_config(str(ROOT / "configs" / config), [
        f"job.run_dir={run_dir}", "job.device=cuda", "training.global_batch=8", "data.seq_len=256",
        "metrics.tensorboard=false", "training.sample_tokens=0", "checkpoint.interval=0",
        "checkpoint.save_final=false", "data.corpus_max_bytes=2000000", *overrides])
    device, _ = preflight(cfg)
    return Trainer(cfg, device, None)


@pytest.mark.parametrize("precision", ["autocast", "fsdp"])
def test_adaptive_cat_compiles_each_chunk_size_once_on_cuda(tmp_path, monkeypatch, precision):
    from torch._dynamo.utils import counters

    monkeypatch.setenv("CAT_TITAN_CACHE", str(tmp_path / "cache"))
    trainer = cuda_trainer("debug_cat_adaptive.yaml", tmp_path / "run", "training.compile=true",
                           "training.steps=60", "training.micro_batch=8", f"training.mixed_precision={precision}")
    cfg = trainer.cfg
    assert trainer.mixed_precision == precision
    sizes = trainer.curriculum.sizes
    counters.clear()
    seen, graphs, times = set(), [], []
    for _ in range(cfg.training.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = trainer.train_step()
        float(out["loss"])
        times.append(time.perf_counter() - t0)
        seen.update(out["chunk_sizes"])
        graphs.append((len(seen), counters["stats"]["unique_graphs"]))
    assert seen == set(sizes), seen  # the random curriculum drew every size
    # 2 block kinds (decoder, compressor) x chunk sizes seen so far: never more
    assert all(g == 2 * n for n, g in graphs), graphs
    first_all = next(i for i, (n, _) in enumerate(graphs) if n == len(sizes))
    steady = times[first_all + 1:]
    assert len(steady) >= 10, f"every size was first drawn at step {first_all}: too late to judge"
    assert max(steady) < 3 * statistics.median(steady), (max(steady), statistics.median(steady))


@pytest.mark.parametrize("config", ["debug_dense.yaml", "debug_cat.yaml", "debug_cat_adaptive.yaml",
                                    "debug_cat_hybrid.yaml"])
def test_autocast_matches_fsdp_mixed_precision_on_cuda(tmp_path, monkeypatch, config):
    """Same weights, same batches: bf16 autocast over fp32 weights and FSDP's bf16 weights
    differ only by rounding (0.03 on losses of ~3-6, 12 steps); both train. Eager blocks,
    so liger's norm, RoPE and SwiGLU kernels run under autocast too (compiled blocks use
    inductor's; the test above compiles under autocast)."""
    monkeypatch.setenv("CAT_TITAN_CACHE", str(tmp_path / "cache"))
    curves = {}
    for precision in ("fsdp", "autocast"):
        trainer = cuda_trainer(config, tmp_path / precision, "training.compile=false", "training.micro_batch=4",
                               "optimizer.lr=3e-3", f"training.mixed_precision={precision}")
        assert trainer.runtime_args.fused_ops == "on", "liger's fused ops should be on for this comparison"
        curves[precision] = [float(trainer.train_step()["loss"]) for _ in range(12)]
        del trainer
    a, b = curves["fsdp"], curves["autocast"]
    assert max(abs(x - y) for x, y in zip(a, b)) < 0.03, (a, b)
    assert a[-1] < a[0] - 0.5 and b[-1] < b[0] - 0.5, (a, b)
