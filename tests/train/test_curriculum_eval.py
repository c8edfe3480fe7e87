"""Adaptive CATs: evaluation, the end-of-run sample and the logged MFU use the chunk sizes the
curriculum actually draws; curriculum.per=micro_step says when a resume changes its schedule.
Real trainer runs (one CPU rank, debug-cat-adaptive: sizes 2, 4, 8)."""

import json
import statistics

import pytest

from cat_titan.models.registry import flops_per_token
from cat_titan.train.curriculum import ChunkCurriculum
from cat_titan.train.trainer import Trainer, main, preflight

from . import ROOT, debug_cat_config

ADAPTIVE = ["model.preset=debug-cat-adaptive", "curriculum.min_chunk_size=2"]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CAT_TITAN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.mark.parametrize("kind, weights, drawn", [("uniform", [], [2, 4, 8]), ("fixed", [], [8]),
                                                  ("weights", [1.0, 0.0, 2.0], [2, 8])])
def test_drawn_sizes_are_what_the_schedule_draws(kind, weights, drawn):
    cur = ChunkCurriculum([2, 4, 8], kind, weights, "micro_step", seed=1)
    assert cur.drawn_sizes == drawn
    assert {cur.chunk_size(s, m, 2) for s in range(300) for m in range(2)} == set(drawn)


def test_eval_and_sample_use_only_drawn_sizes(tmp_path):
    cfg = debug_cat_config(tmp_path / "run", 1, *ADAPTIVE, "curriculum.kind=weights", "curriculum.weights=[1,1,0]",
                           "training.eval_batches=1")
    device, _ = preflight(cfg)
    trainer = Trainer(cfg, device, None)
    assert set(trainer.evaluate()) == {"_chunk2", "_chunk4"}  # 8 has weight 0: never trained
    seen = []
    trainer.model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("chunk_size")), with_kwargs=True)
    trainer.cfg.training.sample_tokens = 2
    trainer.sample()
    assert seen == [4, 4]  # the largest drawn size, not the model's default (8)
    trainer.checkpointer.close()
    trainer.metrics.close()


def test_logged_mfu_averages_the_flops_of_every_micro_step_in_the_window(tmp_path):
    cfg = debug_cat_config(tmp_path / "run", 8, *ADAPTIVE, "curriculum.per=micro_step", "metrics.log_interval=4")
    device, _ = preflight(cfg)
    trainer = Trainer(cfg, device, None)
    trainer.peak = 1e12  # a CPU has no peak in the table; any number shows the arithmetic
    assert trainer.run() == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "mfu" in r]
    assert [r["step"] for r in rows] == [4, 8]
    cur, seq = trainer.curriculum, cfg.data.seq_len
    for r in rows:
        drawn = [cur.chunk_size(s, m, trainer.accum) for s in range(r["step"] - 4, r["step"]) for m in range(2)]
        flops = statistics.mean(flops_per_token(trainer.model_args, seq, c) for c in drawn)
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * flops / 1e12, rel=1e-9)
    assert len({c for s in range(8) for m in range(2) for c in [cur.chunk_size(s, m, 2)]}) > 1  # sizes did vary


def test_micro_step_schedule_change_on_resume_is_reported(tmp_path, capsys):
    base = ["--config", str(ROOT / "configs" / "debug_cat.yaml"), f"job.run_dir={tmp_path / 'run'}", *ADAPTIVE,
            "curriculum.per=micro_step", "data.seq_len=64", "training.global_batch=4", "training.sample_tokens=0",
            "metrics.tensorboard=false", "data.corpus_max_bytes=300000", "training.compile=false"]
    assert main(base + ["training.steps=1", "training.micro_batch=2"]) == 0
    capsys.readouterr()
    assert main(base + ["training.steps=2", "training.micro_batch=4"]) == 0  # 2 -> 1 micro-steps per step
    out = capsys.readouterr().out
    assert "the checkpoint ran 2 micro-steps per step, this run 1" in out
