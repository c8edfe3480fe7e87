"""slurm/train.sbatch on a real Slurm (the ``slurm`` fixture): the script as users submit it,
with 2 CPU processes on the one node (CAT_TITAN_NPROC_PER_NODE=2, gloo) and a tiny CAT.

- a run finishes (exit 0) and is not requeued;
- a run warned mid-training (`scancel --batch --signal=USR1`, what --signal=B:USR1@N does
  before the time limit) saves, exits 75, requeues itself, resumes from its checkpoint and
  ends with the uninterrupted run's losses, step for step (float32 CPU: within 1e-5);
- `scancel` ends every process of the job and does not requeue it;
- a bad config fails before any training process starts, with exit 2 and no requeue;
- a crash is requeued at most CAT_TITAN_MAX_RESTARTS times.

Waiting: a requeued job is held ~120 s (BeginTime) by Slurm; the tests reset its start time.
Time-outs are generous (the machine may be busy); they only bound a failing test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STEPS = 100  # ~7 s of training on an idle 2-core machine: a signal after step 3 lands mid-run
TINY = ["job.device=cpu", "model.preset=debug-cat", "data.seq_len=64", "data.corpus_max_bytes=300000",
        "training.global_batch=8", "training.micro_batch=4", "metrics.tensorboard=false",
        "training.sample_tokens=0", "metrics.log_interval=1", f"training.steps={STEPS}"]
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
TOL = 1e-5

pytestmark = pytest.mark.slow


class Job:
    def __init__(self, slurm, tmp: Path, *overrides: str, env: dict | None = None, sbatch_args: tuple = ()):
        self.slurm, self.out_dir, self.run_dir = slurm, tmp, tmp / "run"
        argv = ["sbatch", "--parsable", f"--output={tmp}/%x-%j.out", *sbatch_args, "slurm/train.sbatch",
                "configs/debug_cat.yaml",
                f"job.run_dir={self.run_dir}", *TINY, *overrides]
        r = subprocess.run(argv, cwd=ROOT, env=slurm.env(**(env or {})), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"sbatch failed: {r.stderr}"
        self.id = r.stdout.strip().split(";")[0]

    def cancel(self) -> None:
        self.slurm.run(["scancel", self.id], check=False)

    def info(self) -> dict:
        return self.slurm.job(self.id)

    def log(self) -> str:
        p = self.out_dir / f"cat_titan-{self.id}.out"
        return p.read_text(errors="replace") if p.exists() else "(no job log yet)"

    def explain(self) -> str:
        return (f"job {self.id}: {self.info()}\n--- job log (tail) ---\n{self.log()[-4000:]}\n"
                f"--- slurmd log (tail) ---\n{self.slurm.daemon_log('slurmd', 1500)}")

    def wait(self, done, timeout: float, what: str) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.info()
            if done(info):
                return info
            time.sleep(0.25)
        pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.explain()}")

    def wait_terminal(self, timeout: float = 300) -> dict:
        return self.wait(lambda i: i.get("JobState") in TERMINAL, timeout, "the job to end")

    def wait_requeued(self, restarts: int, timeout: float = 120) -> dict:
        info = self.wait(lambda i: int(i.get("Restarts", 0)) >= restarts and i.get("JobState") == "PENDING"
                         or i.get("JobState") in TERMINAL, timeout, f"requeue number {restarts}")
        assert info["JobState"] == "PENDING", f"job ended instead of being requeued\n{self.explain()}"
        # Skip Slurm's ~120 s hold, but not within the second of the requeue: slurmd refuses
        # a launch whose credential is not newer (1 s resolution) than the killed instance's.
        time.sleep(2)
        self.slurm.run(["scontrol", "update", f"JobId={self.id}", "StartTime=now"])
        return info

    def wait_steps(self, n: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if len(metric_rows(self.run_dir)) >= n:
                return
            if self.info().get("JobState") in TERMINAL:
                pytest.fail(f"the job ended before logging {n} steps\n{self.explain()}")
            time.sleep(0.1)
        pytest.fail(f"no {n} logged steps within {timeout}s\n{self.explain()}")

    def processes(self) -> list[tuple[int, str]]:
        """Live processes on this machine whose command line names this job's run dir."""
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(self.run_dir) in cmd:
                found.append((int(pid), cmd))
        return found

    def rank_pid(self, rank: int) -> int:
        for pid, cmd in self.processes():
            if "train.py" not in cmd or "entry.py" in cmd or "srun" in cmd or "slurm_script" in cmd:
                continue
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return pid
        pytest.fail(f"no training process of rank {rank} found\n{self.explain()}")

    def rank_env(self, rank: int) -> dict[str, str]:
        raw = Path(f"/proc/{self.rank_pid(rank)}/environ").read_bytes().decode(errors="replace")
        return dict(kv.partition("=")[::2] for kv in raw.split("\0") if kv)


def metric_rows(run_dir: Path) -> list[dict]:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return []
    return [r for r in (json.loads(line) for line in p.read_text().splitlines() if line.strip()) if "loss" in r]


def losses_by_step(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metric_rows(run_dir)}


@pytest.fixture(scope="module")
def env(corpus_cache):
    return {"CAT_TITAN_NPROC_PER_NODE": "2", "CAT_TITAN_CACHE": str(corpus_cache)}


@pytest.fixture(scope="module")
def finished(slurm, env, tmp_path_factory):
    """The uninterrupted run: the reference for the resumed one."""
    job = Job(slurm, tmp_path_factory.mktemp("finished"), env=env)
    try:
        yield job, job.wait_terminal()
    finally:
        job.cancel()  # a no-op unless waiting failed: never leave a job running for the next test


@pytest.fixture
def submit(slurm, env, tmp_path):
    """Job(...) for one test; whatever the test leaves running is cancelled afterwards."""
    jobs = []

    def make(*overrides: str, sbatch_args: tuple = (), **extra_env: str) -> Job:
        jobs.append(Job(slurm, tmp_path, *overrides, env={**env, **extra_env}, sbatch_args=sbatch_args))
        return jobs[-1]

    yield make
    for job in jobs:
        job.cancel()


def test_run_finishes_without_requeue(finished):
    job, info = finished
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), job.explain()
    assert [r["step"] for r in metric_rows(job.run_dir)] == list(range(1, STEPS + 1)), job.explain()
    log = job.log()
    assert "1 node(s) x 2 process(es)" in log and "training finished" in log and "requeueing" not in log, log
    meta = json.loads((job.run_dir / "checkpoints" / f"step-{STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == 2, "the trainer did not run on the 2 processes of the node\n" + log
    copy = job.run_dir / "logs" / f"cat_titan-{job.id}.out"
    assert copy.exists() and "training finished" in copy.read_text(), "no log copy in the run directory"


def test_usr1_saves_requeues_and_resumes_to_the_same_losses(slurm, submit, finished):
    job = submit()
    job.wait_steps(3)
    slurm.run(["scancel", "--batch", "--signal=USR1", job.id])
    job.wait_requeued(1)
    log = job.log()
    assert "stopped with a complete checkpoint (exit 75)" in log, job.explain()
    saved = sorted(int(p.parent.name.split("-")[1]) for p in (job.run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert saved and saved[-1] < STEPS, f"expected a complete mid-run checkpoint, found steps {saved}"
    stopped_at = saved[-1]

    info = job.wait_terminal()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), job.explain()
    # Resumed, not restarted: every step was logged exactly once, in order, across the two runs.
    steps = [r["step"] for r in metric_rows(job.run_dir)]
    assert steps == list(range(1, STEPS + 1)), f"stopped at {stopped_at}; logged steps {steps}"
    ref, got = losses_by_step(finished[0].run_dir), losses_by_step(job.run_dir)
    worst = max(abs(ref[s] - got[s]) for s in ref)
    assert worst <= TOL, f"losses differ from the uninterrupted run by up to {worst} (stopped at step {stopped_at})"
    assert got[STEPS] == pytest.approx(ref[STEPS], abs=TOL)


def test_scancel_leaves_no_processes_and_no_requeue(slurm, submit):
    job = submit()
    job.wait_steps(3)
    assert job.processes(), "no process of the running job found: the check below would prove nothing"
    slurm.run(["scancel", job.id])
    info = job.wait_terminal(timeout=120)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), job.explain()
    left = job.processes()
    assert not left, f"processes left after scancel: {left}"
    assert "will not be requeued" in job.log(), job.explain()


def test_bad_config_fails_before_starting_and_is_not_requeued(submit):
    job = submit("training.steps=many", "no_such_section.key=1")
    info = job.wait_terminal(timeout=60)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), job.explain()
    log = job.log()
    assert "training.steps" in log and "no_such_section" in log, log  # every problem, at once
    assert "srun" not in log and not (job.run_dir / "metrics.jsonl").exists(), log


def test_crash_is_requeued_at_most_max_restarts_times(submit):
    job = submit(CAT_TITAN_MAX_RESTARTS="1")
    job.wait_steps(2)
    os.kill(job.rank_pid(1), signal.SIGKILL)  # a rank dies (OOM killer, hardware): a crash
    job.wait_requeued(1)
    assert "training failed with exit 1 (restart 0 of at most 1)" in job.log(), job.explain()

    rows = len(metric_rows(job.run_dir))
    job.wait_steps(rows + 2)  # the requeued run trains again
    os.kill(job.rank_pid(1), signal.SIGKILL)
    info = job.wait_terminal()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "1:0", "1"), job.explain()
    assert "giving up" in job.log(), job.explain()


def test_ranks_get_the_batch_environment_when_submitted_with_an_export_list(submit):
    """sbatch --export=NONE or a list (SBATCH_EXPORT at some sites) leaves SLURM_EXPORT_ENV in
    the batch shell, which srun inherits: the ranks started without the environment the
    script sets up (PYTHONUNBUFFERED, compile caches, NCCL_DEBUG) or the one it was given."""
    job = submit(sbatch_args=("--export=PATH,HOME,SLURM_CONF,CAT_TITAN_NPROC_PER_NODE,CAT_TITAN_CACHE",),
                 CAT_TITAN_PROBE="a b")
    job.wait_steps(2)
    env = job.rank_env(1)
    assert env.get("PYTHONUNBUFFERED") == "1" and env.get("NCCL_DEBUG") == "WARN" and "TRITON_CACHE_DIR" in env, env
    assert env.get("CAT_TITAN_CACHE") and "CAT_TITAN_PROBE" not in env, env  # the list, and only it, from outside
    info = job.wait_terminal()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), job.explain()


def test_usr1_during_the_scripts_first_lines_is_not_fatal(slurm, submit, tmp_path):
    """A warning that reaches the batch shell in its first lines (a job started less than the
    --signal lead time before its limit, `scancel --batch --signal=USR1` right after the start)
    is kept, not fatal: it killed bash (default action of SIGUSR1), failing the job unrequeued.
    A delayed scontrol (the first command the script runs) widens those lines to seconds."""
    shim = tmp_path / "bin"
    shim.mkdir()
    (shim / "scontrol").write_text(f"#!/bin/sh\nsleep 3\nexec {shutil.which('scontrol')} \"$@\"\n")
    (shim / "scontrol").chmod(0o755)
    job = submit(PATH=f"{shim}:{os.environ['PATH']}", CAT_TITAN_SIGNAL_REPEAT="1")
    job.wait(lambda i: i.get("JobState") == "RUNNING" or i.get("JobState") in TERMINAL, 60, "the job to start")
    time.sleep(1)  # inside the delayed `scontrol show hostnames`
    slurm.run(["scancel", "--batch", "--signal=USR1", job.id])
    job.wait_requeued(1)
    assert "SIGUSR1: asking the trainers" in job.log() and "requeueing" in job.log(), job.explain()


def test_a_second_srun_into_the_same_run_dir_is_refused(slurm, env, tmp_path):
    """Two steps of one allocation (one batch script's two sruns) training into one run
    directory: the same Slurm job id, so before session 13 the second took the lease as "its
    own" and both trained. The lease records the step: the second exits 2 naming the first
    (job and step), and writes nothing; the first keeps training."""
    run = tmp_path / "run"
    args = " ".join(["--config configs/debug_cat.yaml", f"job.run_dir={run}",
                     *[o for o in TINY if not o.startswith("training.steps=")], "training.steps=100000"])
    script = tmp_path / "two_steps.sh"
    script.write_text(f"""#!/bin/bash
cd {ROOT}
srun --overlap -n1 {sys.executable} train.py {args} > {tmp_path}/first.log 2>&1 &
first=$!
for i in $(seq 1200); do [ -s {run}/metrics.jsonl ] && break; sleep 0.1; done
timeout 90 srun --overlap -n1 {sys.executable} train.py {args} > {tmp_path}/second.log 2>&1  # 124: it trained
echo $? > {tmp_path}/second.rc
rows=$(wc -l < {run}/metrics.jsonl); sleep 2; echo "$rows $(wc -l < {run}/metrics.jsonl)" > {tmp_path}/rows
kill -TERM $first; wait $first
""")
    r = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/job.out", str(script)], cwd=ROOT,
                       env=slurm.env(**env), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    job_id = r.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 300
        while slurm.job(job_id).get("JobState") not in TERMINAL:
            assert time.time() < deadline, f"job {job_id} did not end: {slurm.job(job_id)}"
            time.sleep(0.5)
        read = lambda name: (tmp_path / name).read_text() if (tmp_path / name).exists() else f"(no {name})"
        explain = "\n".join(f"--- {n} ---\n{read(n)[-3000:]}" for n in ("job.out", "first.log", "second.log"))
        assert read("second.rc").strip() == "2", explain
        assert f"is in use by job slurm:{job_id} step 0 " in read("second.log"), explain
        before, after = map(int, read("rows").split())
        assert after > before > 0, explain  # the first trained on while the second was refused
    finally:
        slurm.run(["scancel", job_id], check=False)
