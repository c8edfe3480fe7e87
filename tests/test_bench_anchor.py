"""bench_train --anchor torchtitan: torchtitan's Llama3 step timed in the same invocation, at the
model's dense size; and a clear refusal, before any work, where torchtitan is not installed."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAVE_TORCHTITAN = importlib.util.find_spec("torchtitan") is not None
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CMD = [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--config", str(ROOT / "configs" / "debug_dense.yaml"),
       "--steps", "2", "--warmup", "1", "--anchor", "torchtitan", "training.compile=false"]


@pytest.mark.skipif(HAVE_TORCHTITAN, reason="torchtitan is installed here: the missing-dependency path cannot run")
def test_anchor_without_torchtitan_is_refused_before_any_work(tmp_path):
    res = subprocess.run(CMD + ["--json", str(tmp_path / "out.json")], capture_output=True, text=True, env=ENV,
                         timeout=120)
    assert res.returncode != 0
    assert "optional benchmark dependency" in res.stderr and "pip install torchtitan" in res.stderr
    assert "tokens/s" not in res.stdout and not (tmp_path / "out.json").exists()


@pytest.mark.skipif(not HAVE_TORCHTITAN, reason="torchtitan (optional benchmark dependency) is not installed")
def test_anchor_runs_torchtitan_llama3_at_the_dense_size(tmp_path):
    res = subprocess.run(CMD + ["--json", str(tmp_path / "out.json")], capture_output=True, text=True, env=ENV,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    row = json.loads((tmp_path / "out.json").read_text())
    a = row["anchor"]
    from cat_titan.config import load_config

    m = load_config(str(ROOT / "configs" / "debug_dense.yaml"), []).model
    from cat_titan.models.registry import get_preset

    args = get_preset(m.preset)
    assert (a["dim"], a["layers"], a["heads"], a["world"]) == (args.dim, args.n_layers, args.n_heads, 1)
    # one rank: no FSDP, so bf16 comes from autocast as in torchtitan's trainer (without it the
    # anchor trained in fp32: 13.7k instead of 155k tokens/s at 1536x12 on an H200)
    assert a["mixed_precision"] == "bf16 autocast"
    # Llama3 parameters, counted independently: untied embedding and head, 4 attention
    # matrices, SwiGLU with torchtitan's hidden size (8/3 dim rounded up to 256), 2 norms per block
    d, V = args.dim, m.vocab_size
    hidden = 256 * math.ceil(int(8 * d / 3) / 256)
    assert a["params"] == 2 * V * d + args.n_layers * (4 * d * d + 3 * d * hidden + 2 * d) + d
    # cat_titan's FLOPs per token for the same model, counted independently: 6 x (block and
    # head MACs) + the causal attention pairs, L(L+1)/2 per sequence, at 12 FLOPs x width each
    L = a["seq_len"]
    want = 6 * (args.n_layers * (4 * d * d + 3 * d * hidden) + d * V) + 12 * args.n_layers * d * (L + 1) / 2
    assert a["flops_per_token_cat_titan"] == pytest.approx(want, rel=1e-12)
    # torchtitan's convention counts all L x L scores (and the norm weights): more FLOPs
    assert a["flops_per_token"] > a["flops_per_token_cat_titan"]
    assert a["mfu_cat_titan_flops"] is None or a["mfu_cat_titan_flops"] < a["mfu"]
    assert a["tokens_per_sec_per_device"] > 0 and a["step_s_min"] > 0
    assert abs(a["final_loss"] - math.log(V)) < 1.0  # random tokens, three steps from init
    assert "anchor: torchtitan" in res.stdout
