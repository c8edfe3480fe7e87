"""tools/bench_generate.py runs end to end on debug presets (CPU smoke test)."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
    # columns per layer: dense 17 positions; adaptive C=8: 2 * (17 // 8 + 1) + 8 + 1
    assert [r["cache_columns"] for r in rows] == [17, 2 * (17 // 2 + 1) + 2 + 1, 2 * (17 // 8 + 1) + 8 + 1]


def test_bench_generate_rejects_bad_chunk_size():
    cmd = [sys.executable, str(ROOT / "tools" / "bench_generate.py"), "--cat-preset", "debug-cat-adaptive",
           "--dense-preset", "", "--chunk-sizes", "3", "--batch", "1", "--gen-len", "2", "--device", "cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode != 0 and "not valid" in out.stderr, out.stderr
