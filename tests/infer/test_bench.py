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


def test_idle_gaps_merge_overlaps_and_class_gaps(tmp_path):
    """bench_train --profile's idle summary: overlapping spans (two streams) merge, gaps are
    summed by size and the largest are listed with their offset; spans come from the chrome
    trace's kernel, copy and memset events only."""
    import gzip

    from cat_titan.infer.profiling import idle_gaps, trace_device_spans

    # busy 0-10 and 5-12 (overlap), gap 1 us, 13-20, gap 150 us, 170-171, gap 30 us, 201-210
    spans = [(5.0, 12.0), (0.0, 10.0), (13.0, 20.0), (170.0, 171.0), (201.0, 210.0)]
    r = idle_gaps(spans)
    assert r["span_ms"] == 0.21 and abs(r["busy_ms"] - 0.029) < 1e-12 and abs(r["idle_ms"] - 0.181) < 1e-12
    assert r["idle_ms_by_gap"] == {"under 2 us": 0.001, "2-20 us": 0.0, "20-100 us": 0.03, "100 us and more": 0.15}
    assert [(g["us"], g["at_ms"]) for g in r["largest_gaps"]] == [(150.0, 0.02), (30.0, 0.171), (1.0, 0.012)]
    assert idle_gaps([])["idle_ms"] == 0.0

    trace = {"traceEvents": [{"cat": "kernel", "ts": 100.0, "dur": 5.0}, {"cat": "cpu_op", "ts": 0.0, "dur": 500.0},
                             {"cat": "gpu_memcpy", "ts": 110.0, "dur": 2.0}, {"cat": "kernel", "ts": 120.0}]}
    path = tmp_path / "trace-0.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    assert trace_device_spans(path) == [(100.0, 105.0), (110.0, 112.0)]
    # a real torch.profiler trace of CPU work has no device spans
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.ones(8).sum()
    prof.export_chrome_trace(str(tmp_path / "cpu.json"))
    assert trace_device_spans(tmp_path / "cpu.json") == []
