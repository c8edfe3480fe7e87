"""tools/bench_train.py runs the trainer's real step (CPU smoke test; speed is measured on GPUs)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from bench_train import compare_with_fixed  # noqa: E402

ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
SMALL = ["data.corpus_max_bytes=200000", "data.seq_len=64", "training.global_batch=4", "training.micro_batch=2"]


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {"CAT_TITAN_CACHE": str(tmp_path / "cache"), **ENV}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--config",
                        str(ROOT / "configs" / "debug_cat_adaptive.yaml"), "--steps", "3", "--warmup", "1",
                        "--json", str(out), *SMALL],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["tokens_per_sec_per_device"] > 0
    assert row["step_s_min"] <= row["step_s_median"] <= row["step_s_max"]
    assert set(row["chunk_sizes"]) <= {2, 4, 8}  # the config's curriculum (min 2, max 8)
    assert row["flops_per_token"] > 0
    assert row["mixed_precision"] == "none"  # float32 on CPU
    assert len(row["step_s"]) == 3  # on CPU every step is timed
    assert "host_lead_s" not in row  # CUDA only
    assert row["gpu"] is None and row["gpu_error"] == "not a CUDA device"  # clock and power: CUDA only, and why


def test_vs_fixed_compares_the_random_draws_with_each_size_alone(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--config",
                        str(ROOT / "configs" / "debug_cat_adaptive.yaml"), "--steps", "4", "--warmup", "1",
                        "--vs-fixed", "--json", str(out), *SMALL],
                       capture_output=True, text=True, timeout=300, env={"CAT_TITAN_CACHE": str(tmp_path / "c"), **ENV})
    assert r.returncode == 0, r.stderr[-3000:]
    vs = json.loads(out.read_text())["vs_fixed"]
    assert set(vs["sizes"]) == {"2", "4", "8"}  # every size of the curriculum, timed alone
    assert sum(vs["draws"].values()) == 4 * 2  # 4 steps of 2 micro-steps
    # one size per step (curriculum.per=step): the expectation weights each size by its draws
    want = sum(n * vs["sizes"][c]["step_s"] for c, n in vs["draws"].items()) / 8
    assert abs(vs["fixed_step_s"] - want) < 1e-12
    assert abs(vs["overhead"] - (vs["random_step_s"] / want - 1)) < 1e-12
    assert "for the same draws at fixed sizes" in r.stdout


def test_compare_with_fixed_averages_micro_steps_within_a_step():
    fixed = {4: 0.2, 8: 0.1}
    # step 1: micro-steps at 4 and 8 (curriculum.per=micro_step): expected 0.15; step 2: 8 alone
    vs = compare_with_fixed([[4, 8], [8, 8]], 0.13, fixed, 1000.0)
    assert vs["fixed_step_s"] == pytest.approx(0.125)
    assert vs["overhead"] == pytest.approx(0.13 / 0.125 - 1)
    assert vs["draws"] == {4: 1, 8: 3}
    assert vs["sizes"][4]["tokens_per_sec_per_device"] == pytest.approx(5000.0)


def test_vs_fixed_refuses_a_model_without_a_curriculum():
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--config",
                        str(ROOT / "configs" / "debug_cat.yaml"), "--vs-fixed"],
                       capture_output=True, text=True, timeout=120, env=ENV)
    assert r.returncode == 2
    assert "--vs-fixed" in r.stderr and "'cat' model" in r.stderr and "adaptive config" in r.stderr
