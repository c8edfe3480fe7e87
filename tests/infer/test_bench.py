"""tools/bench_generate.py runs end to end on debug presets (CPU smoke test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cat_titan.infer import make_runner
from cat_titan.infer.bench import SpeedConfig

from .util import debug_model

ROOT = Path(__file__).resolve().parents[2]


def test_bench_generate_smoke(tmp_path):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "tools" / "bench_generate.py"), "--cat-preset", "debug-cat-adaptive",
           "--dense-preset", "debug-dense", "--chunk-sizes", "2,8", "--batch", "2", "--prompt-len", "5",
           "--gen-len", "12", "--device", "cpu", "--dtype", "fp32", "--threads", "1", "--json", str(out_json)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tokens_per_s" in out.stdout and "cat_adaptive C=8" in out.stdout, out.stdout
    data = json.loads(out_json.read_text())
    rows = data["results"]
    assert [(r["kind"], r["chunk_size"]) for r in rows] == [("dense", None), ("cat_adaptive", 2),
                                                             ("cat_adaptive", 8)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["gen_len"] == 12 and r["batch"] == 2
        assert r["peak_mem_gib"] > 0 and r["peak_mem_kind"] == "process peak RSS"
    # columns per layer: dense 17 positions; adaptive chunk C: fx_0..fx_{17//C}, sep, C tokens, scratch
    assert [r["cache_columns"] for r in rows] == [17, 17 // 2 + 2 + 2 + 1, 17 // 8 + 2 + 8 + 1]


def test_bench_generate_rejects_bad_chunk_size():
    cmd = [sys.executable, str(ROOT / "tools" / "bench_generate.py"), "--cat-preset", "debug-cat-adaptive",
           "--dense-preset", "", "--chunk-sizes", "3", "--batch", "1", "--gen-len", "2", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode != 0 and "not valid" in out.stderr, out.stderr


def test_autotune_needs_compile_and_sets_the_mode_itself():
    with pytest.raises(ValueError, match="autotune needs compile"):
        SpeedConfig(autotune=True).validate()
    runner = make_runner(debug_model("debug-dense"), 1, 8, 0)
    with pytest.raises(ValueError, match="sets the compile mode itself"):
        runner.compile_step(mode="max-autotune", autotune=True)
    cmd = [sys.executable, str(ROOT / "tools" / "bench_generate.py"), "--autotune", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 2 and "--autotune needs --compile" in out.stderr, out.stderr


def test_cuda_kernel_rows_count_kernels_once():
    """Device-time tables (bench_generate --profile, bench_train --profile) keep device-side
    events only: a CPU op and a profiler annotation report their kernels' time again. The
    events are built by hand: no CUDA profiler runs here."""
    from types import SimpleNamespace

    from cat_titan.infer.profiling import kernel_rows

    def event(key, device, us):
        return SimpleNamespace(key=key, device_type=SimpleNamespace(name=device), self_device_time_total=us, count=2)

    events = [event("nvjet_sm90_tst_192x192", "CUDA", 300.0), event("aten::mm", "CPU", 300.0),
              event("Optimizer.step#AdamW.step", "CUDA", 100.0), event("triton_poi_fused_add", "CUDA", 100.0),
              event("## Call CompiledFxGraph abc ##", "CUDA", 400.0), event("FSDP::pre_forward", "CUDA", 50.0)]
    prof = SimpleNamespace(key_averages=lambda: events)
    rows = kernel_rows(prof, 2, "cuda")
    assert [r["name"] for r in rows] == ["nvjet_sm90_tst_192x192", "triton_poi_fused_add"]
    assert rows[0]["us_per_step"] == 150.0 and abs(rows[0]["share"] - 0.75) < 1e-9
