"""Value checks of cat_titan.config: every bad value is reported at once, with its key, the
value and what is allowed, before any work starts."""

from __future__ import annotations

import pytest

from cat_titan.config import load_config
from cat_titan.confutil import ConfigError


def test_negative_counts_and_intervals_are_refused_all_at_once() -> None:
    bad = {
        "checkpoint.interval": -1,      # saved every step (step % -1 == 0)
        "checkpoint.keep_every": -2,    # acted like 2
        "training.eval_interval": -1,
        "training.eval_batches": 0,     # validation loss nan (a mean over no batches)
        "data.num_workers": -1,         # crashed when the loader was built
        "data.corpus_max_bytes": -5,    # an empty corpus, then a traceback
    }
    with pytest.raises(ConfigError) as info:
        load_config(None, ["job.run_dir=x"] + [f"{k}={v}" for k, v in bad.items()])
    errors = info.value.errors
    assert len(errors) == len(bad), errors
    for key, value in bad.items():
        line = next((e for e in errors if e.startswith(f"{key}={value} ")), None)
        assert line is not None, (key, errors)
        assert "must be" in line, line  # says what is allowed


def test_zero_keeps_its_documented_meaning() -> None:
    """0 is 'off' / 'only at the end' / 'in the training process' for these keys."""
    cfg = load_config(None, ["job.run_dir=x", "checkpoint.interval=0", "checkpoint.keep_every=0",
                             "training.eval_interval=0", "data.num_workers=0", "training.eval_batches=1",
                             "data.corpus_max_bytes=1"])
    assert (cfg.checkpoint.interval, cfg.checkpoint.keep_every, cfg.training.eval_interval,
            cfg.data.num_workers, cfg.training.eval_batches, cfg.data.corpus_max_bytes) == (0, 0, 0, 0, 1, 1)
    assert load_config(None, ["job.run_dir=x"]).data.corpus_max_bytes is None  # None: the whole corpus
    with pytest.raises(ConfigError, match=r"data.corpus_max_bytes=0 must be"):
        load_config(None, ["job.run_dir=x", "data.corpus_max_bytes=0"])  # no files at all


@pytest.mark.parametrize("overrides, says", [
    (["training.activation_checkpoint=every_n", "training.ac_every=0"], "training.ac_every=0 must be >= 1"),
    (["training.activation_checkpoint=every_n", "training.ac_every=-1"], "training.ac_every=-1 must be >= 1"),
    (["model.preset=debug-cat", "model.compressor_heads=0"], "model.compressor_heads=0 must be positive"),
    (["model.preset=debug-cat", "model.compressor_layers=0"], "model.compressor_layers=0 must be positive"),
    (["model.preset=debug-cat-layer", "model.cat_layer_head_dim=0"], "model.cat_layer_head_dim=0 must be positive"),
    (["model.vocab_multiple=0"], "model.vocab_multiple=0 must be positive"),
    (["model.n_kv_heads=-2"], "model.n_kv_heads=-2 must be positive, or null"),
    (["model.preset=debug-cat", "model.compressor_kv_heads=-1"], "model.compressor_kv_heads=-1 must be positive"),
    (["model.intermediate_size=-8"], "model.intermediate_size=-8 must be positive"),
    (["model.dim=96", "model.n_heads=32"], "head dim model.dim/model.n_heads=3 must be even"),
    (["model.preset=debug-cat", "model.compressor_dim=48", "model.compressor_heads=16"],
     "compressor head dim model.compressor_dim/model.compressor_heads=3 must be even"),
])
def test_bad_model_and_checkpointing_values_are_config_errors(overrides, says) -> None:
    """Each was accepted and failed later (a division by zero inside validation or parallelize,
    a reshape or RoPE shape error at the first forward), or was silently misread."""
    with pytest.raises(ConfigError) as info:
        load_config(None, ["job.run_dir=x", "data.seq_len=64", *overrides])
    assert any(says in e for e in info.value.errors), info.value.errors


def test_precision_plans_the_trainer_would_refuse_are_config_errors(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="mixed_precision=autocast runs without FSDP, but this job has 2"):
        load_config(None, ["job.run_dir=x", "training.mixed_precision=autocast"])
    with pytest.raises(ConfigError, match="mixed_precision=autocast with parallelism.tp=2 is not supported"):
        load_config(None, ["job.run_dir=x", "training.mixed_precision=autocast", "parallelism.tp=2"])
    load_config(None, ["job.run_dir=x", "training.mixed_precision=fsdp", "parallelism.tp=2"])  # fine


def test_flex_attention_cannot_train_on_cpu(tmp_path, capsys, monkeypatch) -> None:
    from pathlib import Path

    from cat_titan.train.trainer import main

    monkeypatch.setenv("CAT_TITAN_CACHE", str(tmp_path / "cache"))
    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    assert main(["--config", str(root / "configs" / "debug_cat.yaml"), f"job.run_dir={run}",
                 "model.attn_backend=flex", "job.device=cpu"]) == 2
    assert "model.attn_backend=flex cannot train on CPU" in capsys.readouterr().err
    assert not run.exists()


def test_batch_and_override_errors_suggest_the_fix(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"= 16; e.g. training.micro_batch=4"):
        load_config(None, ["job.run_dir=x", "training.global_batch=8", "training.micro_batch=8"])
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"a config file goes after --config: --config configs/x.yaml"):
        load_config(None, ["configs/x.yaml"])  # `train.py configs/x.yaml` without --config


def test_tp_head_check_skips_decoder_heads_of_an_all_cat_layer_stack(monkeypatch):
    """A CAT layer splits its inner heads (dim_fx / cat_layer_head_dim) under TP; model.n_heads
    only sets its rotary width, so an all-CAT stack need not divide it (tests/parallel/test_tp.py
    runs such a model with tp=2)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    base = ["job.run_dir=x", "model.preset=debug-hybrid", "model.n_heads=1", "parallelism.tp=2"]
    load_config(None, [*base, "model.layer_pattern=[cat]"])
    with pytest.raises(ConfigError, match="model.n_heads=1 is not divisible by parallelism.tp=2"):
        load_config(None, base)  # [cat, cat, dense]: the dense layer splits n_heads
