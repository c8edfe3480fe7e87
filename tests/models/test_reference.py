"""Reference parity: the shipped fixtures, unseen fixture-format files, conversion round trips.

Tolerance: max abs logit difference <= 1e-4 in float32 (the fixtures' README); observed ~5e-6.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cat_titan.models.args import ModelArgs
from cat_titan.models.reference import (ReferenceFormatError, check_state_dict, native_to_reference,
                                        reference_configs, reference_to_native)
from cat_titan.models.registry import build_model
from cat_titan.parity import run_parity

from . import independent

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT.parent / "shared" / "fixtures" / "reference"
FIXTURE_FILES = sorted(FIXTURES.glob("*.safetensors"))


def test_fixtures_present():
    assert {f.name for f in FIXTURE_FILES} >= {"dense.safetensors", "cat.safetensors", "cat_adaptive.safetensors",
                                                 "cat_layer.safetensors"}, f"fixtures missing under {FIXTURES}"


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
def test_fixture_parity(path):
    results = run_parity(path)
    assert results, "no outputs were checked"
    for r in results:
        assert r.ok, f"{path.name} {r.name}: {r.max_abs_diff} {r.detail}"
    if path.name == "cat.safetensors":
        names = {r.name for r in results}
        assert {"logits", "logits_odd", "greedy_tokens[full-forward]", "greedy_tokens[cached]"} <= names


def test_parity_cli_all_fixtures():
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "reference_parity.py"), *map(str, FIXTURE_FILES)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 9 and all(line.endswith("ok") or " ok " in line for line in lines), out.stdout
    # greedy lines count tokens; they said "max_abs_diff=0 tokens differ ok 0 differing tokens"
    assert "cat.safetensors greedy_tokens[cached]: 0 tokens differ out of 64 ok" in lines, out.stdout


# --------------------------------------------------------------------------------------
# files the tool has never seen: weights from a random native model converted to the
# reference format, outputs computed by tests/models/independent.py
# --------------------------------------------------------------------------------------
UNSEEN = {
    "dense_gqa_qknorm": ModelArgs(kind="dense", dim=96, n_layers=2, n_heads=6, n_kv_heads=2, qk_norm=True,
                                  vocab_size=300, block_size=48),
    "cat_gqa_chunk4": ModelArgs(kind="cat", dim=96, n_layers=2, n_heads=6, n_kv_heads=3, chunk_size=4,
                                compressor_dim=48, compressor_layers=2, compressor_heads=4,
                                compressor_kv_heads=2, vocab_size=200, block_size=48, qk_norm=True),
    "cat_chunk16": ModelArgs(kind="cat", dim=64, n_layers=1, n_heads=4, chunk_size=16, compressor_dim=32,
                             compressor_heads=2, vocab_size=100, block_size=64),
    "adaptive16_gqa": ModelArgs(kind="cat_adaptive", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, chunk_size=16,
                                compressor_dim=32, compressor_heads=2, vocab_size=120, block_size=64),
    "cat_layer_qknorm": ModelArgs(kind="cat_layer", dim=32, n_layers=2, n_heads=4, chunk_size=4, dim_fx=128,
                                  qk_norm=True, vocab_size=90, block_size=32),
}


def _random_reference_file(tmp_path, name, args, seed=0):
    model = build_model(args, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # move norms / special embeddings off their init values
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    ref = native_to_reference(model.state_dict(), args)
    configs = reference_configs(args)
    tensors = {"model." + k: v.contiguous() for k, v in ref.items()}
    ids = torch.randint(0, args.vocab_size, (2, args.block_size), generator=g)
    odd = ids[:, : args.block_size - 3].contiguous()
    with torch.no_grad():
        if args.kind == "dense":
            tensors.update(input_ids=ids, logits=independent.dense_forward(ref, configs["model"], ids))
        elif args.kind == "cat_layer":
            tensors.update(input_ids=ids, logits=independent.cat_layer_forward(ref, configs, ids))
        elif args.kind == "cat":
            tensors.update(input_ids=ids, logits=independent.cat_forward(ref, configs, ids),
                           input_ids_odd=odd, logits_odd=independent.cat_forward(ref, configs, odd))
        else:
            tensors["input_ids"] = ids
            for c in args.chunk_sizes:
                tensors[f"logits_chunk{c}"] = independent.cat_forward(ref, configs, ids, chunk=c)
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata={"configs": json.dumps(configs), "dtype": "float32"})
    return path, model


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_unseen_fixture_format_files(tmp_path, name):
    args = UNSEEN[name]
    path, _ = _random_reference_file(tmp_path, name, args)
    results = run_parity(path)
    assert len(results) >= (len(args.chunk_sizes) if args.kind == "cat_adaptive" else 1)
    for r in results:
        assert r.ok, f"{name} {r.name}: {r.max_abs_diff}"


def test_parity_cli_fails_on_wrong_outputs(tmp_path):
    path, _ = _random_reference_file(tmp_path, "dense", UNSEEN["dense_gqa_qknorm"])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["logits"] = tensors["logits"] + 1e-3  # a 1e-3 error must be caught
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "reference_parity.py"), str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "FAIL" in out.stdout, out.stdout


def test_parity_cli_in_bf16_checks_logits_loosely_and_reports_greedy_as_information(tmp_path):
    """bf16 rounds the reference's fp32 computation (logits differ by ~0.05-0.09 on the
    fixtures): the default bf16 tolerance passes them, greedy lines do not fail the run, and a
    wrong model (one weight scaled) still fails."""
    fixture = FIXTURE_FILES[0]
    cmd = [sys.executable, str(ROOT / "tools" / "reference_parity.py"), "--dtype", "bf16"]
    out = subprocess.run(cmd + [str(fixture)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    greedy = [line for line in out.stdout.splitlines() if "greedy" in line]
    assert greedy and all(line.endswith(" ok") or "informational" in line for line in greedy), out.stdout

    from safetensors import safe_open

    with safe_open(str(fixture), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors["model.wte.weight"] = tensors["model.wte.weight"] * 3  # the decoder's embeddings: a wrong model
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    out = subprocess.run(cmd + [str(bad)], capture_output=True, text=True)
    assert out.returncode == 1 and "logits: max_abs_diff" in out.stdout and "FAIL" in out.stdout, out.stdout


def test_parity_cli_reports_bad_file(tmp_path):
    bad = tmp_path / "nometa.safetensors"
    save_file({"x": torch.zeros(1)}, str(bad))
    out = subprocess.run([sys.executable, str(ROOT / "tools" / "reference_parity.py"), str(bad),
                          str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert out.returncode == 1
    assert "configs" in out.stdout and "no such file" in out.stdout, out.stdout


@pytest.mark.parametrize("name", sorted(UNSEEN))
def test_conversion_round_trip_is_lossless(name):
    args = UNSEEN[name]
    model = build_model(args, seed=3)
    sd = model.state_dict()
    back = reference_to_native(native_to_reference(sd, args), args)
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_bad_state_dicts_are_named():
    args = UNSEEN["cat_chunk16"]
    model = build_model(args, seed=0)
    ref = native_to_reference(model.state_dict(), args)
    with pytest.raises(ReferenceFormatError, match="unexpected key"):
        reference_to_native({**ref, "f.bogus.weight": torch.zeros(1)}, args)
    sd = reference_to_native(ref, args)
    missing = dict(sd)
    missing.pop("cond.weight")
    with pytest.raises(ReferenceFormatError, match="missing keys.*cond.weight"):
        check_state_dict(missing, model)
    wrong = dict(sd)
    wrong["head.output.weight"] = torch.zeros(3, 3)
    with pytest.raises(ReferenceFormatError, match=r"head.output.weight: got \(3, 3\)"):
        check_state_dict(wrong, model)
