"""On CUDA: the trainer's compiled adaptive CAT builds one graph per chunk size and block
kind, each once, and a steady run under the random curriculum compiles nothing more and
has no step several times slower than the median (a recompile or a stall would be one).
Runs the real Trainer (FSDP2 on one GPU, bf16, compiled blocks, FlexAttention)."""

import statistics
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

ROOT = Path(__file__).resolve().parents[2]


def test_adaptive_cat_compiles_each_chunk_size_once_on_cuda(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    from cat_titan.config import load_config
    from cat_titan.train.trainer import Trainer, preflight

    monkeypatch.setenv("CAT_TITAN_CACHE", str(tmp_path / "cache"))
    cfg = load_config(str(ROOT / "configs" / "debug_cat_adaptive.yaml"), [
        f"job.run_dir={tmp_path / 'run'}", "job.device=cuda", "training.compile=true", "training.steps=60",
        "training.global_batch=8", "training.micro_batch=8", "data.seq_len=256", "metrics.tensorboard=false",
        "training.sample_tokens=0", "checkpoint.interval=0", "checkpoint.save_final=false",
        "data.corpus_max_bytes=2000000"])
    device, _ = preflight(cfg)
    trainer = Trainer(cfg, device, None)
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
