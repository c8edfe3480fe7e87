"""The reference fixture's greedy_tokens, checked by the cached generation path too."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from cat_titan.parity import run_parity

ROOT = Path(__file__).resolve().parents[2]
CAT_FIXTURE = ROOT.parent / "shared" / "fixtures" / "reference" / "cat.safetensors"
GREEDY = ("greedy_tokens[full-forward]", "greedy_tokens[cached]")

pytestmark = pytest.mark.skipif(not CAT_FIXTURE.is_file(), reason=f"fixture missing: {CAT_FIXTURE}")


def test_fixture_greedy_tokens_both_paths():
    results = {r.name: r for r in run_parity(CAT_FIXTURE)}
    for name in GREEDY:
        assert results[name].ok and results[name].max_abs_diff == 0, results[name]


def test_wrong_greedy_tokens_fail_both_lines(tmp_path):
    with safe_open(str(CAT_FIXTURE), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    want = tensors["greedy_tokens"].clone()
    want[0, -3] = (want[0, -3] + 1) % 256  # one wrong token near the end
    tensors["greedy_tokens"] = want
    bad = tmp_path / "cat_bad_greedy.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "reference_parity.py"), str(bad)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4, out.stdout  # logits, logits_odd, two greedy lines
    for name in GREEDY:
        line = next(l for l in lines if name in l)
        assert "FAIL" in line and "1 tokens differ" in line, line
