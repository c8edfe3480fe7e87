"""tools/bench_train.py runs the trainer's real step (CPU smoke test; speed is measured on GPUs)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_train_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = {"CAT_TITAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_train.py"), "--config",
                        str(ROOT / "configs" / "debug_cat_adaptive.yaml"), "--steps", "3", "--warmup", "1",
                        "--json", str(out), "data.corpus_max_bytes=200000", "data.seq_len=64",
                        "training.global_batch=4", "training.micro_batch=2"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["tokens_per_sec_per_device"] > 0
    assert row["step_s_min"] <= row["step_s_median"] <= row["step_s_max"]
    assert set(row["chunk_sizes"]) <= {2, 4, 8}  # the config's curriculum (min 2, max 8)
    assert row["flops_per_token"] > 0
    assert row["mixed_precision"] == "none"  # float32 on CPU
