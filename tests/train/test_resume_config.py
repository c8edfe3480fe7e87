"""What a resumed or restarted run takes from its config and what it refuses: real train.py
runs (in this process, one CPU rank, debug_dense), real checkpoints and metrics files.

- metrics.jsonl keeps one row per step when an attempt killed before its first checkpoint is
  started again; the logged lr is the rate the step applied;
- changed optimizer settings (lr, betas, eps, weight decay) take effect on resume and are
  logged; changed stream settings (seq_len, global batch, seed) are refused before any work,
  every key named, no advice to delete a good checkpoint;
- checkpoint.resume=PATH survives a requeue: the job continues from its own newer
  checkpoints, which record PATH as their origin; a history of another origin is refused;
- unusable data or tokenizer settings exit 2 (a configuration error), not 1 (a crash).
"""

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from cat_titan.train.checkpoint import read_meta
from cat_titan.train.trainer import main

ROOT = Path(__file__).resolve().parents[2]
LR, WARMUP = 3e-3, 4


def train(run_dir, *extra, steps=4):
    return main(["--config", str(ROOT / "configs" / "debug_dense.yaml"), f"job.run_dir={run_dir}",
                 f"training.steps={steps}", "data.seq_len=64", "training.global_batch=4", "training.micro_batch=2",
                 "training.compile=false", "metrics.log_interval=1", "training.sample_tokens=0",
                 "metrics.tensorboard=false", "data.corpus_max_bytes=300000", "training.eval_interval=0",
                 f"optimizer.lr={LR}", f"schedule.warmup_steps={WARMUP}", "schedule.kind=constant", *extra])


def rows(run_dir: Path) -> list[dict]:
    """The training rows (evaluation rows have no "loss")."""
    return [r for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "loss" in (r := json.loads(line))]


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CAT_TITAN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def test_restart_before_the_first_checkpoint_logs_each_step_once_and_the_applied_lr(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # what an attempt killed at step 5, before any checkpoint, leaves: rows and a cut line
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 6))
                                       + '{"step": 6, "lo')
    assert train(run, "checkpoint.interval=0", "checkpoint.save_final=false") == 0
    got = rows(run)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert all(r["loss"] != 9.0 for r in got)
    # warm-up: step k (1-based) applies lr * k / WARMUP
    assert [r["lr"] for r in got] == pytest.approx([LR * k / WARMUP for k in (1, 2, 3, 4)], rel=1e-12)


def test_resume_applies_the_configs_optimizer_settings_and_refuses_stream_changes(tmp_path, capsys):
    run = tmp_path / "run"
    assert train(run, steps=2) == 0  # final checkpoint at step 2
    ckpt = run / "checkpoints" / "step-2"
    before = {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()}

    # the sample stream would change: refused before any work, every key named
    capsys.readouterr()
    rc = train(run, "data.seq_len=32", "training.seed=7", steps=4)
    err = capsys.readouterr().err
    assert rc == 2
    assert "data.seq_len: checkpoint 64 vs config 32" in err and "training.seed: checkpoint 0 vs config 7" in err
    assert "checkpoint.init_from=" in err and "delete" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2"]
    assert {p.name: p.stat().st_mtime_ns for p in ckpt.iterdir()} == before

    # a new lr and weight decay take effect (the schedule is constant after warm-up: step 3 on)
    assert train(run, "optimizer.lr=1e-2", "optimizer.weight_decay=0.0", "optimizer.beta2=0.99", steps=4) == 0
    out = capsys.readouterr().out
    assert "optimizer.lr 0.003 -> 0.01" in out and "optimizer.weight_decay 0.1 -> 0.0" in out
    assert "optimizer.beta2 0.95 -> 0.99" in out
    lrs = {r["step"]: r["lr"] for r in rows(run) if "lr" in r}
    assert lrs[3] == pytest.approx(1e-2 * 3 / WARMUP) and lrs[4] == pytest.approx(1e-2)
    assert lrs[2] == pytest.approx(LR * 2 / WARMUP)  # the first attempt's rows stay
    # the step-4 checkpoint holds the new settings (a later resume starts from them)
    dcp_to_torch_save(run / "checkpoints" / "step-4", tmp_path / "step4.pt")
    saved = torch.load(tmp_path / "step4.pt", weights_only=False)
    assert [(g["lr"], g["weight_decay"], g["betas"]) for g in saved["app"]["optim"]["param_groups"]] == \
        [(1e-2, 0.0, (0.9, 0.99)), (1e-2, 0.0, (0.9, 0.99))]
    assert saved["train"]["scheduler"]["base_lrs"] == [1e-2, 1e-2]


def test_resume_from_a_path_survives_a_requeue_and_refuses_another_history(tmp_path, capsys):
    src, job = tmp_path / "src", tmp_path / "job"
    assert train(src, steps=2) == 0
    path = src / "checkpoints" / "step-2"
    assert train(job, f"checkpoint.resume={path}", "checkpoint.interval=1", steps=4) == 0
    meta = read_meta(job / "checkpoints" / "step-4")
    assert meta["origin"] == {"path": str(path.resolve()), "step": 2}
    first = rows(job)

    # Slurm requeues the same command: it continues from the job's own newest checkpoint
    with pytest.warns(UserWarning, match="already continues that checkpoint"):
        assert train(job, f"checkpoint.resume={path}", "checkpoint.interval=1", steps=5) == 0
    assert [r["step"] for r in rows(job)] == [3, 4, 5]
    assert rows(job)[:2] == first
    assert read_meta(job / "checkpoints" / "step-5")["origin"] == meta["origin"]  # inherited

    # a run directory whose checkpoints started elsewhere (here: afresh) is not continued
    other = tmp_path / "other"
    assert train(other, "checkpoint.interval=1", steps=3) == 0
    capsys.readouterr()
    assert train(other, f"checkpoint.resume={path}", steps=4) == 2
    assert "holds newer complete checkpoints (steps [3])" in capsys.readouterr().err


@pytest.mark.parametrize("override, says", [("data.tokenizer=nope", "nope"),
                                            ("data.path={tmp}/not-prepared", "not-prepared")])
def test_unusable_data_settings_exit_2_before_the_run_dir_is_written(tmp_path, capsys, override, says):
    (tmp_path / "not-prepared").mkdir()
    run = tmp_path / "run"
    assert train(run, override.format(tmp=tmp_path)) == 2
    assert says in capsys.readouterr().err
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()


def test_divergence_under_nonfinite_stop_exits_3(tmp_path, capsys):
    """An lr of 1e6 overflows the loss within a few steps; the run stops with status 3 (Slurm
    does not requeue it: resuming would meet the same divergence), naming the step."""
    run = tmp_path / "run"
    assert train(run, "optimizer.lr=1e6", "schedule.warmup_steps=1", "training.nonfinite=stop",
                 "checkpoint.interval=0", steps=20) == 3
    err = capsys.readouterr().err
    assert "non-finite" in err and "training.nonfinite=skip" in err


def test_prepared_data_records_the_tokenizer_it_was_prepared_with(tmp_path, capsys):
    """data.tokenizer names the embedded corpus's tokenizer: with data.path the shards' own
    tokenizer is used, the run says so, and config.yaml records that one (it recorded the
    ignored value)."""
    from cat_titan.config import load_config
    from cat_titan.data.corpus import prepare_corpus

    src = tmp_path / "txt"
    src.mkdir()
    (src / "a.py").write_text("def f(x):\n    return x + 1\n" * 400)
    prepare_corpus([src], tmp_path / "data", "byte", val_fraction=0.1)
    run = tmp_path / "run"
    assert train(run, f"data.path={tmp_path / 'data'}", "data.tokenizer=cl100k_base", steps=1) == 0
    assert "was prepared with tokenizer 'byte'; data.tokenizer='cl100k_base' applies only" in capsys.readouterr().out
    assert load_config(str(run / "config.yaml"), []).data.tokenizer == "byte"
