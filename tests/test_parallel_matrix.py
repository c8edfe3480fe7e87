"""tools/parallel_matrix.py on real gloo processes (CPU, float32): FSDP=2 and TP=2, with and
without full activation checkpointing, train.py for 3 steps each; the curves agree (float32:
identical up to rounding) and the report says so. The speed and bf16 use is on GPUs."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

from parallel_matrix import compare  # noqa: E402


def test_matrix_runs_layouts_and_compares_curves(tmp_path):
    out = tmp_path / "mx"
    cmd = [sys.executable, str(ROOT / "tools" / "parallel_matrix.py"),
           "--config", str(ROOT / "configs" / "debug_cat.yaml"), "--nproc", "2", "--out", str(out),
           "--layouts", "fsdp,tp", "--compile", "off", "--ac", "none,full",
           "--steps", "3", "--global-batch", "4", "--skip", "0", "data.seq_len=64", "data.corpus_max_bytes=300000"]
    env = {"CAT_TITAN_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runs = {x["name"]: x for x in json.loads((out / "matrix.json").read_text())["runs"]}
    assert set(runs) == {"fsdp-eager-none", "tp-eager-none", "fsdp-eager-full", "tp-eager-full"}
    base = runs["fsdp-eager-none"]["losses"]
    assert len(base) == 3 and base[-1] < base[0]
    for run in runs.values():
        assert run["rc"] == 0 and run["agrees"]
        assert max(abs(a - b) for a, b in zip(base, run["losses"])) < 2e-5
    assert "| tp-eager-full | 3 |" in (out / "matrix.md").read_text()
    # a second call finds every run measured and repeats none
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and again.stdout.count("already measured") == 4, again.stdout[-2000:]


def test_compare_flags_a_drifting_curve():
    base = [10.0, 8.0, 6.0, 5.0, 4.0]
    noise = [10.0, 8.01, 5.99, 5.01, 4.0]
    drift = [10.0, 8.0, 6.1, 5.1, 4.1]
    assert compare(base, noise)["mean_rel"] < 0.005 and compare(base, noise)["tail_rel"] < 0.005
    assert compare(base, drift)["tail_rel"] > 0.005
