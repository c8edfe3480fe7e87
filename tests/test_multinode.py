"""Multi-node launch on one machine: two torchrun "nodes" (--nnodes=2, one process each,
c10d rendezvous on 127.0.0.1) train a tiny CAT to the same losses as the one-machine
launcher (scripts/launch_local.sh, torchrun --standalone with 2 processes); float32 on CPU,
tolerance 2e-5 (the rendezvous may order the ranks differently).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8
TINY = ["job.device=cpu", "model.preset=debug-cat", "data.seq_len=64", "data.corpus_max_bytes=300000",
        "training.global_batch=8", "training.micro_batch=4", "metrics.tensorboard=false", "training.sample_tokens=0",
        "metrics.log_interval=1", f"training.steps={STEPS}"]
TOL = 2e-5
TIMEOUT = 240

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


def world_size(run_dir: Path) -> int:
    """The world size recorded in the run's final checkpoint."""
    return json.loads((run_dir / "checkpoints" / f"step-{STEPS}" / "meta.json").read_text())["world_size"]


def start(argv: list[str], env: dict, log: Path) -> subprocess.Popen:
    # Own session: on a timeout the whole launch (torchrun and its workers) is killed by group.
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def finish(procs: list[subprocess.Popen], logs: list[Path]) -> None:
    try:
        for p in procs:
            p.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        pytest.fail("launch timed out:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"exit {p.returncode}:\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "CAT_TITAN_CACHE": str(tmp_path_factory.mktemp("cache")), "PYTHONUNBUFFERED": "1"}


def test_two_node_torchrun_matches_one_machine_launch(tmp_path, env):
    single = tmp_path / "single"
    log = tmp_path / "single.log"
    p = start(["bash", "scripts/launch_local.sh", "configs/debug_cat.yaml", f"job.run_dir={single}", *TINY],
              {**env, "NPROC": "2", "CAT_TITAN_PYTHON": sys.executable}, log)
    finish([p], [log])
    assert world_size(single) == 2, log.read_text()

    multi = tmp_path / "multi"
    port = free_port()
    logs = [tmp_path / f"node{r}.log" for r in range(2)]
    procs = [start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={r}",
                    "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}",
                    f"--rdzv_id=multinode-{port}", "train.py", "--config", "configs/debug_cat.yaml",
                    f"job.run_dir={multi}", *TINY], env, logs[r]) for r in range(2)]
    finish(procs, logs)
    assert world_size(multi) == 2, "".join(log.read_text() for log in logs)  # one world, not two runs of 1

    a, b = losses(single), losses(multi)
    assert len(a) == len(b) == STEPS, (a, b)
    worst = max(abs(x - y) for x, y in zip(a, b))
    assert worst < TOL, f"two-node losses differ from the one-machine launch by {worst}: {a} vs {b}"
    assert a[-1] < a[0], a  # it trains


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").iterdir():
            kids = [int(c) for c in (task / "children").read_text().split()]
            out += kids
            todo += kids
    return out


def test_usr1_to_one_rank_stops_the_local_launch_with_a_checkpoint_and_75(tmp_path, env):
    """README's way to stop scripts/launch_local.sh: SIGUSR1 to any one rank (torchrun puts each
    rank in a session of its own; the launcher ignores SIGUSR1). The ranks agree, all save,
    and the launcher exits 75; the same command again resumes."""
    import time

    run, log = tmp_path / "run", tmp_path / "launch.log"
    argv = ["bash", "scripts/launch_local.sh", "configs/debug_cat.yaml", f"job.run_dir={run}",
            *TINY[:-1], "training.steps=100000", "checkpoint.interval=0"]
    p = start(argv, {**env, "NPROC": "2", "CAT_TITAN_PYTHON": sys.executable}, log)
    try:
        deadline = time.time() + TIMEOUT
        while not (run / "metrics.jsonl").is_file() or len(losses(run)) < 2:
            assert p.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        ranks = [pid for pid in _descendants(p.pid)
                 if "train.py" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGUSR1)  # one rank only
        assert p.wait(TIMEOUT) == 75, log.read_text()[-4000:]
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    steps = sorted(int(d.name[5:]) for d in (run / "checkpoints").glob("step-*") if (d / "COMPLETE").is_file())
    assert len(steps) == 1 and steps[0] >= 2, (steps, log.read_text()[-3000:])


def test_a_save_error_on_rank_0_only_ends_the_launch_instead_of_hanging(tmp_path, env):
    """Only rank 0 prepares a checkpoint directory, so an error there (here: a file where the
    step's directory must go) leaves the other ranks in a barrier. torchrun's agent ends them
    when rank 0 exits, so the launch fails at once instead of waiting out a collective
    timeout; nothing else in the run directory is touched."""
    import time

    run, log = tmp_path / "run", tmp_path / "launch.log"
    (run / "checkpoints").mkdir(parents=True)
    blocker = run / "checkpoints" / "step-4"
    blocker.write_text("not a checkpoint\n")
    argv = ["bash", "scripts/launch_local.sh", "configs/debug_cat.yaml", f"job.run_dir={run}", *TINY,
            "checkpoint.interval=4"]
    t0 = time.time()
    p = start(argv, {**env, "NPROC": "2", "CAT_TITAN_PYTHON": sys.executable}, log)
    try:
        rc = p.wait(TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail("the launch hung after rank 0's save error:\n" + log.read_text()[-3000:])
    text = log.read_text()
    assert rc != 0 and "[rank0]" in text and "NotADirectoryError" in text, text[-3000:]
    assert time.time() - t0 < TIMEOUT / 2, text[-3000:]
    assert blocker.read_text() == "not a checkpoint\n"
    assert len(losses(run)) == 4, text[-3000:]  # steps 1-4 ran, then the save at step 4 failed
