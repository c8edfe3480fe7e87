"""slurm/entry.py without a cluster: the node exit status kept from the workers' statuses,
and the config check that train.sbatch runs before starting any node."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("slurm_entry", ROOT / "slurm" / "entry.py")
entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(entry)


@pytest.mark.parametrize("codes, status", [
    ([], 0),             # every worker succeeded
    ([75, 75], 75),      # all saved and stopped
    ([75, -15], 75),     # one stopped after the complete checkpoint, torchrun's clean-up hit the other
    ([2, 2], 2),         # bad config on every rank
    ([1, -15], 1),       # a crash, then clean-up
    ([-9, 1], 1),        # a rank killed, its peer's collective failed
    ([-9], 1),           # killed by a signal is a crash, not a status to pass on
    ([2, 1], 1),         # mixed failures
])
def test_node_status(codes, status):
    assert entry.node_status(codes) == status


def test_check_prints_run_dir_and_rejects_bad_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.chdir(tmp_path)  # check reads the run directory: the config's default is relative
    config = str(ROOT / "configs" / "debug_cat.yaml")
    assert entry.main(["check", "--config", config, f"job.run_dir={tmp_path / 'run'}", "training.global_batch=8",
                       "training.micro_batch=4"]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "run").resolve())
    assert not (tmp_path / "run").exists()  # checking writes nothing

    # micro_batch 8 x 2 ranks does not divide global_batch 8: a problem only WORLD_SIZE reveals
    assert entry.main(["check", "--config", config, "training.global_batch=8", "training.micro_batch=8"]) == 2
    assert "global_batch" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert entry.main(["check", "--config", config, "training.global_batch=8", "training.micro_batch=8"]) == 0
    capsys.readouterr()
    assert entry.main(["check", "--config", config, "training.steps=many", "no_such.key=1"]) == 2
    err = capsys.readouterr().err
    assert "training.steps" in err and "no_such" in err, err  # every problem at once
    assert entry.main(["bogus"]) == 2


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def test_check_runs_train_preflight_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """What train.py refuses before any process group (a resume collision, a model shape other
    than the run's checkpoint) fails the check too, with exit 2, so no node is started."""
    monkeypatch.setenv("WORLD_SIZE", "1")
    run = tmp_path / "run"
    args = ["--config", str(ROOT / "configs" / "debug_dense.yaml"), f"job.run_dir={run}", "training.steps=1",
            "data.seq_len=64", "training.global_batch=2", "training.micro_batch=2", "training.sample_tokens=0",
            "metrics.tensorboard=false", "data.corpus_max_bytes=20000"]
    env = {**os.environ, "CAT_TITAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and (run / "checkpoints" / "step-1").is_dir(), r.stderr
    before = _snapshot(run)
    for extra, says in [("checkpoint.resume=never", "checkpoint.resume=never but"),
                        ("model.n_layers=5", "model.n_layers: checkpoint 2 vs config 5")]:
        assert entry.main(["check", *args, extra]) == 2, extra
        err = capsys.readouterr().err
        assert says in err, err
    assert entry.main(["check", *args]) == 0  # checkpoint.resume=auto continues the run
    assert capsys.readouterr().out.strip() == str(run.resolve())
    assert _snapshot(run) == before  # checking writes nothing


def test_torchrun_launcher_survives_usr1_while_importing_torch(tmp_path):
    """The launcher ignores SIGUSR1 from its first line: a warning that reaches the step while
    it still imports torch (about a second) is dropped, as the docstring says, and does not
    kill the node (it did: the launcher died of SIGUSR1, exit -10)."""
    args = ["--config", str(ROOT / "configs" / "debug_dense.yaml"), f"job.run_dir={tmp_path / 'run'}",
            "training.steps=1", "data.seq_len=64", "training.global_batch=2", "training.micro_batch=2",
            "training.sample_tokens=0", "metrics.tensorboard=false", "data.corpus_max_bytes=20000"]
    env = {**os.environ, "CAT_TITAN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, str(ROOT / "slurm" / "entry.py"), "torchrun", "--standalone",
                          "--nproc-per-node=1", str(ROOT / "train.py"), *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while "libtorch" not in Path(f"/proc/{p.pid}/maps").read_text():  # torch's import has begun
            assert p.poll() is None and time.time() < deadline, "the launcher never loaded torch"
            time.sleep(0.005)
        p.send_signal(signal.SIGUSR1)
        out, _ = p.communicate(timeout=300)
    finally:
        p.kill()
    assert p.returncode == 0, f"exit {p.returncode}\n{out[-3000:]}"


def test_check_refuses_a_run_dir_another_live_job_holds(tmp_path, monkeypatch, capsys):
    """train.sbatch's check reads the run directory's lease: another job's fresh lease exits 2
    naming it; this job's own (a requeue: same SLURM_JOB_ID) or a stale one passes; nothing
    is written either way."""
    import json
    import socket

    run = tmp_path / "run"
    run.mkdir()
    lease = run / ".lease.json"
    config = [str(ROOT / "configs" / "debug_cat.yaml"), f"job.run_dir={run}"]
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.setenv("WORLD_SIZE", "1")

    def hold(job, age):
        lease.write_text(json.dumps(dict(job=job, host=socket.gethostname() + "-elsewhere", pid=1, owner="o",
                                         started=time.time() - age, heartbeat=time.time() - age)))
        return lease.read_bytes()

    held = hold("slurm:999", 5)
    assert entry.main(["check", "--config", *config]) == 2
    err = capsys.readouterr().err
    assert "in use by job slurm:999" in err and str(lease) in err, err
    assert lease.read_bytes() == held
    for job, age in (("slurm:1234", 5), ("slurm:999", 400)):  # this job's own; abandoned 400 s ago
        held = hold(job, age)
        assert entry.main(["check", "--config", *config]) == 0, capsys.readouterr().err
        assert lease.read_bytes() == held
    hold("slurm:999", 5)
    assert entry.main(["check", "--config", *config, "job.lease_timeout_s=0"]) == 0  # no lease: not checked
