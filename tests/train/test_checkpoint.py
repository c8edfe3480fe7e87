"""Checkpoints for real: `python train.py` jobs (1, 2 and 4 gloo ranks as separate processes,
torchrun-style environment), killed with SIGKILL at a random step and in the middle of a
save, preempted with SIGUSR1/SIGTERM, resumed on the same and on other layouts; corrupt and
mismatched checkpoints refused without writing anything; retention; async saves marked
complete only after every rank's write.

Exactness: on the same layout a resumed run's per-step losses equal the uninterrupted run's
bit for bit (CPU float32, one thread per process); on another layout they agree within
RESHARD_TOL (the layouts themselves differ by ~1e-6, see test_trainer.py).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from ..distributed import free_port, launch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "debug_cat.yaml")
STEPS = 8
RESHARD_TOL = 1e-5
BASE = ["model.preset=debug-cat-adaptive", "data.seq_len=64", "training.global_batch=8", "training.micro_batch=4",
        "metrics.log_interval=1", "training.eval_batches=1", "training.sample_tokens=0", "metrics.tensorboard=false",
        "data.corpus_max_bytes=300000", "optimizer.lr=3e-3", "schedule.warmup_steps=2", f"training.steps={STEPS}",
        "checkpoint.interval=2", "checkpoint.keep=2", "checkpoint.keep_every=4"]

# Parallel layouts: name -> (world size, overrides). Resharding cases below name a source and a
# destination layout; a TP layout is one more entry, e.g. "tp2": (2, ["parallelism.tp=2"]),
# with cases ("fsdp2", "tp2") and ("tp2", "single").
LAYOUTS = {
    "single": (1, []),
    "fsdp2": (2, []),
    "hsdp2x2": (4, ["parallelism.dp_replicate=2", "training.micro_batch=2"]),
}
RESHARD_CASES = [("fsdp2", "single"), ("single", "fsdp2"), ("fsdp2", "hsdp2x2")]

# Runs train.py's main; test-only slowdowns come from the environment, so that a test can
# catch a run between steps or inside a save: CAT_TITAN_TEST_STEP_DELAY=seconds after every
# step, CAT_TITAN_TEST_SLOW_SAVE=WHICH:SECONDS:FLAG (touch FLAG.rankR, then sleep, after the
# shards are written and before meta.json/COMPLETE; WHICH is a step, or "blocking": the
# first synchronous save, i.e. the preemption save of a run whose interval saves are async).
WRAPPER = r"""
import os, sys, time
from pathlib import Path
from cat_titan.train import checkpoint as ck, trainer as tr

delay = float(os.environ.get("CAT_TITAN_TEST_STEP_DELAY", "0"))
if delay:
    _step = tr.Trainer.train_step
    def train_step(self):
        out = _step(self)
        time.sleep(delay)
        return out
    tr.Trainer.train_step = train_step
slow = os.environ.get("CAT_TITAN_TEST_SLOW_SAVE")
if slow:
    at, seconds, flag = slow.split(":", 2)
    _save, _finalize = ck.Checkpointer.save, ck.Checkpointer._finalize
    def save(self, step, state, info=None, blocking=False):
        self.wait()  # a pending async save is finalized first, as save() itself would
        self.slow_next = blocking
        return _save(self, step, state, info, blocking)
    def finalize(self, path, step, info, t0):
        global at
        if at == str(step) or (at == "blocking" and getattr(self, "slow_next", False)):
            at = None
            Path(f"{flag}.rank{os.environ['RANK']}").write_text(str(step))
            time.sleep(float(seconds))  # a signal's handler runs, then the sleep goes on
        return _finalize(self, path, step, info, t0)
    ck.Checkpointer.save, ck.Checkpointer._finalize = save, finalize
sys.exit(tr.main(sys.argv[1:]))
"""


class Job:
    """One training job: ``world`` train.py processes with torchrun-style variables."""

    def __init__(self, run_dir: Path, world: int, overrides=(), env=None):
        self.run_dir, self.world = Path(run_dir), world
        self.run_dir.parent.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.logs = [self.run_dir.parent / f"{self.run_dir.name}.{time.time_ns()}.rank{r}.log" for r in range(world)]
        self.procs = []
        for r in range(world):
            e = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
                 "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                 "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default", **(env or {})}
            with open(self.logs[r], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-c", WRAPPER, "--config", CONFIG, f"job.run_dir={run_dir}", *BASE, *overrides],
                    cwd=ROOT, env=e, stdout=log, stderr=subprocess.STDOUT))

    def wait(self, timeout: float = 180) -> list[int]:
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(max(1.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"job {self.run_dir} did not finish in {timeout}s:\n{self.output()}")
        return [p.returncode for p in self.procs]

    def running(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def signal(self, rank: int, sig) -> None:
        self.procs[rank].send_signal(sig)

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
        for p in self.procs:
            p.wait()

    def output(self, rank: int = 0) -> str:
        return self.logs[rank].read_text()


def run_job(run_dir, layout: str, overrides=(), expect: int = 0) -> Job:
    world, extra = LAYOUTS[layout]
    job = Job(run_dir, world, [*extra, *overrides])
    codes = job.wait()
    assert codes == [expect] * world, (codes, job.output())
    return job


def wait_until(cond, timeout: float = 120, what: str = "condition", job: Job | None = None) -> None:
    deadline = time.time() + timeout
    while not cond():
        if job is not None and not job.running():
            raise AssertionError(f"job ended before {what}:\n{job.output()}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"metrics.jsonl holds a step twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def last_logged_step(run_dir: Path) -> int:
    try:
        text = (Path(run_dir) / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]
    return max(steps, default=0)


def checkpoints(run_dir: Path) -> dict[int, bool]:
    """step -> complete, for every step directory."""
    root = Path(run_dir) / "checkpoints"
    return {int(p.name[5:]): (p / "COMPLETE").is_file() for p in root.glob("step-*")} if root.is_dir() else {}


def snapshot(path: Path) -> dict:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(Path(path).rglob("*"))}


# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("CAT_TITAN_CACHE", str(cache))  # the subprocesses inherit it
        yield {"CAT_TITAN_CACHE": str(cache)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_env):
    """layout -> run directory of an uninterrupted run (made on first use); fsdp2 saves async."""
    root = tmp_path_factory.mktemp("uninterrupted")
    done: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in done:
            extra = ["checkpoint.async_save=true"] if layout == "fsdp2" else []
            run_job(root / layout, layout, extra)
            done[layout] = root / layout
        return done[layout]

    return get


# ---------------------------------------------------------------------------------------
def test_uninterrupted_runs_keep_the_retained_checkpoints(uninterrupted):
    for layout in ("single", "fsdp2"):  # sync and async saves
        run = uninterrupted(layout)
        # keep=2 newest (6, 8) plus every 4th (4); step 2 deleted
        assert checkpoints(run) == {4: True, 6: True, 8: True}, (layout, checkpoints(run))
        meta = json.loads((run / "checkpoints" / "step-8" / "meta.json").read_text())
        assert meta["step"] == 8 and meta["tokens_seen"] == 8 * 8 * 64
        assert meta["world_size"] == LAYOUTS[layout][0] and meta["model_args"]["kind"] == "cat_adaptive"
        assert sorted(losses(run)) == list(range(1, STEPS + 1))


def test_sigkill_during_a_save_and_at_a_random_step_then_resume_exactly(uninterrupted, tmp_path):
    want = losses(uninterrupted("single"))
    run, flag = tmp_path / "killed", tmp_path / "saving"
    step4 = run / "checkpoints" / "step-4"

    # SIGKILL inside the save of step 4: shards and .metadata written, no meta.json/COMPLETE yet
    job = Job(run, 1, env={"CAT_TITAN_TEST_SLOW_SAVE": f"4:60:{flag}"})
    wait_until(lambda: Path(f"{flag}.rank0").exists(), what="the save of step 4", job=job)
    job.kill()
    assert checkpoints(run) == {2: True, 4: False}
    assert (step4 / ".metadata").is_file() and not (step4 / "meta.json").exists()

    # resumed from step 2 (step 4 skipped with a warning, then saved again); SIGKILL between
    # steps, at a step drawn by a seeded RNG
    kill_at = random.Random(1234).randint(5, STEPS - 1)
    job = Job(run, 1, env={"CAT_TITAN_TEST_STEP_DELAY": "0.3"})
    wait_until(lambda: last_logged_step(run) >= kill_at, what=f"step {kill_at}", job=job)
    job.signal(0, signal.SIGKILL)
    assert job.wait() == [-signal.SIGKILL]
    out = job.output()
    assert f"skipping incomplete checkpoint {step4}" in out, out
    assert f"resumed from {run / 'checkpoints' / 'step-2'}" in out, out
    assert last_logged_step(run) < STEPS, "the run ended before it was killed"
    newest = max(s for s, complete in checkpoints(run).items() if complete)
    assert newest >= 4

    job = run_job(run, "single")
    assert f"resumed from {run / 'checkpoints' / f'step-{newest}'}" in job.output()
    assert losses(run) == want  # every step, bit for bit; the killed attempts' extra rows were dropped
    assert checkpoints(run) == {4: True, 6: True, 8: True}


def test_preemption_signals_on_two_ranks_save_exit_75_and_resume_exactly(uninterrupted, tmp_path):
    """SIGUSR1 reaches rank 1 only; both ranks stop after the same step and save it; SIGTERM
    to rank 0 and another SIGUSR1 to rank 1 in the middle of that save do not disturb it."""
    from cat_titan.train.checkpoint import verify_checkpoint

    want = losses(uninterrupted("fsdp2"))
    run, flag = tmp_path / "preempted", tmp_path / "saving"
    # the step delay lets the signal land inside a step; interval saves are async, so the
    # preemption save is the first synchronous one and the one made slow
    job = Job(run, 2, ["checkpoint.async_save=true"],
              env={"CAT_TITAN_TEST_STEP_DELAY": "0.3", "CAT_TITAN_TEST_SLOW_SAVE": f"blocking:2:{flag}"})
    wait_until(lambda: last_logged_step(run) >= 3, what="step 3", job=job)
    stop = last_logged_step(run)
    job.signal(1, signal.SIGUSR1)
    wait_until(lambda: Path(f"{flag}.rank0").exists(), what="the preemption save", job=job)
    job.signal(0, signal.SIGTERM)
    job.signal(1, signal.SIGUSR1)
    codes = job.wait()
    assert codes == [75, 75], (codes, job.output(0), job.output(1))
    saved = max(s for s, complete in checkpoints(run).items() if complete)
    assert stop <= saved == last_logged_step(run) < STEPS
    verify_checkpoint(run / "checkpoints" / f"step-{saved}")
    assert "[preemption] received SIGUSR1" in job.output(1)
    assert f"checkpoint saved at step {saved}; exiting with status 75" in job.output(0)

    job = run_job(run, "fsdp2")
    assert f"resumed from {run / 'checkpoints' / f'step-{saved}'}" in job.output()
    assert losses(run) == want


@pytest.mark.parametrize("src,dst", RESHARD_CASES)
def test_resharded_resume_matches_the_uninterrupted_run(uninterrupted, tmp_path, src, dst):
    source = uninterrupted(src)
    want = losses(source)
    run = tmp_path / f"{src}-to-{dst}"
    job = run_job(run, dst, [f"checkpoint.resume={source / 'checkpoints' / 'step-4'}"])
    assert "resumed from" in job.output()
    got = losses(run)
    assert sorted(got) == list(range(5, STEPS + 1))
    worst = max(abs(got[s] - want[s]) for s in got)
    assert worst < RESHARD_TOL, (src, dst, got, want)
    meta = json.loads((run / "checkpoints" / f"step-{STEPS}" / "meta.json").read_text())
    assert meta["world_size"] == LAYOUTS[dst][0]


def test_bad_checkpoints_are_refused_before_anything_is_written(uninterrupted, tmp_path, capsys):
    """main() fails in its preflight (no process group): exit 2, a message naming the file or
    field and the fix, and not one byte of the run directory changed."""
    from cat_titan.train.trainer import main

    good = uninterrupted("single")

    def refused(name: str, corrupt, extra=(), *expect: str) -> None:
        run = tmp_path / name
        if corrupt is None:  # a fresh run directory (checkpoint.init_from)
            run.mkdir()
        else:
            shutil.copytree(good, run)
            corrupt(run / "checkpoints" / "step-8")
        before = snapshot(run)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(["--config", CONFIG, f"job.run_dir={run}", *BASE, "training.steps=10", *extra])
        err = capsys.readouterr().err
        assert rc == 2, (name, err)
        for text in expect:
            assert text in err, (name, text, err)
        assert snapshot(run) == before, name

    def truncate(f: Path):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])

    nothing = (lambda path: None)
    step8 = "checkpoints/step-8"
    refused("shape", nothing, ["model.dim=64", "model.n_layers=3"],
            "different model", "model.dim: checkpoint 128 vs config 64", "model.n_layers: checkpoint 2 vs config 3")
    refused("no_metadata", lambda p: (p / ".metadata").unlink(), (), f"{step8}/.metadata is missing", "delete")
    refused("garbled_metadata", lambda p: (p / ".metadata").write_bytes(b"\x80\x04garbage" * 10), (),
            f"{step8}/.metadata is unreadable", "delete")
    refused("truncated_shard", lambda p: truncate(p / "__0_0.distcp"), (), f"{step8}/__0_0.distcp is truncated",
            "delete")
    refused("bad_meta", lambda p: (p / "meta.json").write_text("{not json"), (), f"{step8}/meta.json is corrupt",
            "delete")
    refused("never", nothing, ["checkpoint.resume=never"], "checkpoint.resume=never", "use a new job.run_dir")
    refused("older", nothing, [f"checkpoint.resume={good / 'checkpoints' / 'step-4'}"],
            "holds newer complete checkpoints (steps [6, 8])")
    refused("missing", nothing, [f"checkpoint.resume={tmp_path / 'nope'}"], "no such checkpoint")
    refused("init_from", None, ["model.dim=64", f"checkpoint.init_from={good / 'checkpoints' / 'step-8'}"],
            "model.dim: checkpoint 128 vs config 64")


def test_retention_keeps_newest_and_every_nth_and_removes_partial_saves(tmp_path):
    from cat_titan.train.checkpoint import Checkpointer, latest_complete, resolve_resume

    root = tmp_path / "checkpoints"
    for s in range(1, 9):
        (root / f"step-{s}").mkdir(parents=True)
        (root / f"step-{s}" / "shard").write_text("x")
        if s != 8:
            (root / f"step-{s}" / "COMPLETE").write_text("")
    ck = Checkpointer(tmp_path, keep=1, keep_every=3, async_save=False, is_main=True, meta={})
    ck._retain()
    assert checkpoints(tmp_path) == {3: True, 6: True, 7: True}  # newest, every 3rd; partial 8 gone
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        (root / "step-9").mkdir()
        assert latest_complete(tmp_path) == root / "step-7"
    assert resolve_resume(tmp_path / "fresh", "auto") is None  # a fresh run directory


def run_async_marker(rank, world, run_dir):
    """An async save is marked complete only once every rank's write has finished: rank 1
    writes slowly; rank 0 finishes first and must not write the marker meanwhile."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemWriter

    from cat_titan.train.checkpoint import Checkpointer, verify_checkpoint

    dist.init_process_group("gloo")
    if rank == 1:
        write = FileSystemWriter.write_data

        def slow_write(self, *a, **kw):
            time.sleep(1.5)
            return write(self, *a, **kw)

        FileSystemWriter.write_data = slow_write
    ck = Checkpointer(Path(run_dir), keep=3, keep_every=0, async_save=True, is_main=rank == 0,
                      meta={"model_args": {}}, async_group=dist.new_group(backend="gloo"))
    path = ck.save(1, {f"rank{rank}": torch.full((1000,), float(rank))})
    polls = 0
    while True:  # what Trainer._agree does once per step
        flag = torch.tensor([float(not ck.pending_done_locally())])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            break
        assert not (path / "COMPLETE").exists()
        polls += 1
        time.sleep(0.05)
    ck.finalize_pending()
    assert (path / "COMPLETE").is_file() and verify_checkpoint(path)["step"] == 1
    dist.destroy_process_group()
    return polls


def test_async_save_marked_complete_after_every_rank_wrote(tmp_path, cache_env):
    polls = launch(run_async_marker, 2, str(tmp_path), env=cache_env)
    assert min(polls) > 5, polls  # rank 0 kept training while rank 1 was still writing


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def test_sigterm_to_every_process_with_loader_workers_saves_and_exits_75(tmp_path, cache_env):
    """Slurm's scancel, time limit or preemption signal every process of the step, the data
    loader's worker processes too: they ignore it (before, one died of it and its trainer
    crashed with exit 1 instead of saving), the trainer saves and exits 75."""
    run = tmp_path / "run"
    job = Job(run, 1, ["data.num_workers=2", "checkpoint.interval=0", "training.steps=50"],
              env={**cache_env, "CAT_TITAN_TEST_STEP_DELAY": "0.2"})
    wait_until(lambda: last_logged_step(run) >= 2, what="step 2", job=job)
    pid = job.procs[0].pid
    workers = _children(pid)
    assert len(workers) >= 2, workers
    for p in [pid, *workers]:
        os.kill(p, signal.SIGTERM)
    assert job.wait() == [75], job.output()
    steps = checkpoints(run)
    assert len(steps) == 1 and all(steps.values()), (steps, job.output())
