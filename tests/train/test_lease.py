"""One job per run directory (cat_titan/train/lease.py): real files, real processes.

The lease is taken before anything is written, renewed by a thread, honoured while its
holder lives, taken over from this job's own earlier attempt, a dead process or a stale
heartbeat, and a job whose lease was taken over stops without saving."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cat_titan.train.lease import (LEASE_NAME, LeaseError, RunLease, job_attempt, job_identity, lease_problem,
                                   read_lease)

ROOT = Path(__file__).resolve().parents[2]


def _hold(run: Path, **kw) -> bytes:
    record = dict(job="slurm:999", host="node-elsewhere", pid=1, owner="theirs", started=time.time(),
                  heartbeat=time.time())
    record.update(kw)
    run.mkdir(parents=True, exist_ok=True)
    (run / LEASE_NAME).write_text(json.dumps(record))  # a whole-file write, as the holder's rename makes
    return (run / LEASE_NAME).read_bytes()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_job_identity_survives_restarts_and_ignores_torchruns_default_id():
    assert job_identity({"SLURM_JOB_ID": "77", "TORCHELASTIC_RUN_ID": "abc"}) == "slurm:77"
    assert job_identity({"TORCHELASTIC_RUN_ID": "abc"}) == "torchrun:abc"
    host = socket.gethostname()
    # torchrun's default rendezvous id "none" is shared by unrelated launches: its agent (our parent) instead
    assert job_identity({"TORCHELASTIC_RUN_ID": "none", "TORCHELASTIC_RESTART_COUNT": "0"}) == \
        f"torchrun:{host}:{os.getppid()}"
    assert job_identity({}) == f"{host}:{os.getpid()}"


def test_job_attempt_is_slurms_requeue_count_and_step():
    assert job_attempt({}) == (None, None)
    assert job_attempt({"TORCHELASTIC_RUN_ID": "abc"}) == (None, None)
    assert job_attempt({"SLURM_JOB_ID": "77"}) == (0, "batch")  # the batch script, before any requeue
    assert job_attempt({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "2", "SLURM_STEP_ID": "1"}) == (2, "1")


@pytest.mark.parametrize("held, ours, taken", [
    ((0, "0"), (1, "0"), True),        # a requeue: the earlier attempt's lease
    ((0, "0"), (1, "batch"), True),    # ... seen by train.sbatch's check, before the new attempt's srun
    ((1, "0"), (1, "0"), True),        # the same step again: torchrun restarting its workers
    ((1, "0"), (1, "1"), False),       # a second srun of the same attempt into the same run directory
    ((2, "0"), (1, "0"), False),       # a later attempt's lease: not this (older) process's to take
    ((None, None), (1, "3"), True),    # a lease from before attempts were recorded: as before, its own
])
def test_takeover_within_one_slurm_job_follows_attempt_and_step(tmp_path, held, ours, taken):
    run = tmp_path / "run"
    before = _hold(run, job="slurm:5", attempt=held[0], step=held[1])
    lease = RunLease(run, timeout_s=10, job="slurm:5", attempt=ours[0], step=ours[1], log=lambda m: None,
                     settle_s=0)
    if not taken:
        with pytest.raises(LeaseError, match=rf"in use by job slurm:5 step {held[1]} "):
            lease.acquire()
        assert (run / LEASE_NAME).read_bytes() == before
        assert lease_problem(run, 10, "slurm:5", *ours) is not None
        return
    assert lease_problem(run, 10, "slurm:5", *ours) is None
    lease.acquire()
    try:
        record = read_lease(run)
        assert record["owner"] == lease.token and (record["attempt"], record["step"]) == ours
    finally:
        lease.release()


def test_a_process_under_slurm_records_its_attempt_and_step(tmp_path):
    """RunLease and lease_problem without a job: the process's own environment (real child
    processes with Slurm's variables, as srun sets them). While the holder lives, another step
    of its attempt is refused and its own step or a later attempt may take the lease."""
    run = tmp_path / "run"
    code = ("import sys, json; from cat_titan.train.lease import RunLease, read_lease; "
            "l = RunLease(sys.argv[1], 10, settle_s=0).acquire(); r = read_lease(sys.argv[1]); "
            "print(json.dumps([r['job'], r['attempt'], r['step']]), flush=True); sys.stdin.read()")
    env = dict(os.environ, PYTHONPATH=str(ROOT), SLURM_JOB_ID="31", SLURM_RESTART_COUNT="1", SLURM_STEP_ID="0")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)], env=env, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(holder.stdout.readline()) == ["slurm:31", 1, "0"]
        check = ("import sys; from cat_titan.train.lease import lease_problem; "
                 "print(lease_problem(sys.argv[1], 10) or 'free')")
        for step, restarts, free in (("1", "1", False), ("0", "1", True), ("1", "2", True)):
            out = subprocess.run([sys.executable, "-c", check, str(run)], capture_output=True, text=True, timeout=120,
                                 env=dict(env, SLURM_STEP_ID=step, SLURM_RESTART_COUNT=restarts))
            assert out.returncode == 0, out.stderr
            assert (out.stdout.strip() == "free") == free, (step, restarts, out.stdout)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def test_acquire_renews_and_releases(tmp_path):
    run = tmp_path / "run"
    lease = RunLease(run, timeout_s=10, job="slurm:1", settle_s=0).acquire()  # renewed every 1 s
    try:
        first = read_lease(run)
        assert first["job"] == "slurm:1" and first["owner"] == lease.token and first["pid"] == os.getpid()
        time.sleep(1.6)
        assert read_lease(run)["heartbeat"] > first["heartbeat"] and not lease.lost.is_set()
        assert [p.name for p in run.iterdir()] == [LEASE_NAME]  # no temporary file left behind
    finally:
        lease.release()
    assert not (run / LEASE_NAME).exists()


@pytest.mark.parametrize("holder, taken", [
    (dict(), False),                                          # another job, alive elsewhere, fresh
    (dict(age=8), False),                                     # ... 8 s old with a 10 s timeout
    (dict(job="slurm:1"), True),                              # this job's own: a requeue
    (dict(age=60), True),                                     # stale
    (dict(host=socket.gethostname(), pid="dead"), True),      # its process is gone from this host
    (dict(host=socket.gethostname(), pid=os.getpid(), job="slurm:2"), False),  # alive on this host
])
def test_takeover_rules(tmp_path, holder, taken):
    run = tmp_path / "run"
    holder = dict(holder)
    if holder.get("pid") == "dead":
        holder["pid"] = _dead_pid()
    if "age" in holder:
        holder["heartbeat"] = time.time() - holder.pop("age")
    before = _hold(run, **holder)
    logs = []
    lease = RunLease(run, timeout_s=10, job="slurm:1", log=logs.append, settle_s=0)
    if not taken:
        with pytest.raises(LeaseError, match=rf"in use by job {holder.get('job', 'slurm:999')}.*{LEASE_NAME}"):
            lease.acquire()
        assert (run / LEASE_NAME).read_bytes() == before and sorted(p.name for p in run.iterdir()) == [LEASE_NAME]
        return
    lease.acquire()
    try:
        assert read_lease(run)["owner"] == lease.token
        assert bool(logs) == (holder.get("job") != "slurm:1")  # a takeover from another job is logged, with why
    finally:
        lease.release()


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", json.dumps(dict(job="slurm:9", host="h", owner="o",
                                                                               pid="12", heartbeat=time.time()))])
def test_unreadable_lease_is_taken_over(tmp_path, content):
    """A lease file that is not JSON, or not a RunLease's record (here: pid as a string), is
    taken over with a log line, not a crash."""
    run = tmp_path / "run"
    run.mkdir()
    (run / LEASE_NAME).write_text(content)
    logs = []
    lease = RunLease(run, timeout_s=10, job="slurm:1", log=logs.append, settle_s=0).acquire()
    assert read_lease(run)["owner"] == lease.token and "unreadable" in logs[0]
    lease.release()


def _race(run, job, start, results):
    time.sleep(max(0.0, start - time.time()))
    try:
        lease = RunLease(run, timeout_s=10, job=job, log=lambda m: None).acquire()
        results.put((job, "held"))
        time.sleep(1.0)
        lease.release()
    except LeaseError:
        results.put((job, "refused"))


def test_processes_racing_for_a_fresh_run_dir_get_one_holder(tmp_path):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start = time.time() + 3.0  # after every process has imported
    procs = [ctx.Process(target=_race, args=(tmp_path / "run", f"slurm:{i}", start, results)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    outcome = sorted(results.get(timeout=5)[1] for _ in procs)
    assert outcome == ["held", "refused", "refused", "refused"], outcome
    assert not (tmp_path / "run" / LEASE_NAME).exists()  # released by the holder


def _train(run: Path, *extra: str, timeout_s: float = 10) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SLURM_JOB_ID", None)
    cmd = [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "debug_cat.yaml"),
           f"job.run_dir={run}", f"job.lease_timeout_s={timeout_s}", "metrics.log_interval=1", "metrics.progress=false",
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)


def test_second_trainer_is_refused_and_a_taken_over_trainer_stops_without_saving(tmp_path):
    """Trainer A runs; trainer B on the same run directory exits 2 before writing anything.
    Then another job takes A's lease over (as after A was suspended past the timeout): A
    stops within a few steps, exit 2, without saving, and leaves the new holder's lease."""
    run = tmp_path / "run"
    a = _train(run, "training.steps=100000", "checkpoint.interval=0", "checkpoint.save_final=true")
    try:
        deadline = time.time() + 240
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
            assert a.poll() is None and time.time() < deadline, a.stdout.read() if a.poll() is not None else "slow"
            time.sleep(0.5)
        files = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.name not in (LEASE_NAME, "metrics.jsonl")
                 and "tensorboard" not in p.parts}
        b = _train(run, "training.steps=5")
        out_b, _ = b.communicate(timeout=240)
        assert b.returncode == 2, out_b[-3000:]
        assert "is in use by job" in out_b and f"pid {a.pid}" in out_b, out_b[-3000:]
        assert {p: p.stat().st_mtime_ns for p in files} == files  # B wrote nothing
        assert read_lease(run)["pid"] == a.pid

        taken = _hold(run, job="slurm:4242")
        out_a, _ = a.communicate(timeout=120)
    finally:
        if a.poll() is None:
            a.kill()
    assert a.returncode == 2, out_a[-3000:]
    assert "another job took over" in out_a and "without saving" in out_a, out_a[-3000:]
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())  # no save, final included
    assert (run / LEASE_NAME).read_bytes() == taken  # the new holder's lease is left alone


def test_release_removes_the_directories_acquire_made_while_empty(tmp_path):
    """A run refused after the lease (bad data settings) leaves nothing behind; a run that
    wrote anything keeps its directory."""
    lease = RunLease(tmp_path / "a" / "b" / "run", timeout_s=10, job="slurm:1", settle_s=0).acquire()
    lease.release()
    assert list(tmp_path.iterdir()) == []
    lease = RunLease(tmp_path / "run", timeout_s=10, job="slurm:1", settle_s=0).acquire()
    (tmp_path / "run" / "config.yaml").write_text("x")
    lease.release()
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]
