"""One job per run directory: a lease file that the job's rank 0 holds and renews.

Two jobs training into one ``job.run_dir`` (an sbatch submitted twice, a resubmission while
the first job still runs or hangs) would write checkpoints over each other, prune each
other's checkpoints and interleave their metrics. So the job's global rank 0 takes
``RUN_DIR/.lease.json`` before anything is written and rewrites its heartbeat every
``timeout / 10`` seconds from a thread. A lease held by another job is honoured unless:

- it is this job's own (same Slurm job id or torchrun run id: a requeue or a restart). Under
  Slurm the lease also records the attempt (``SLURM_RESTART_COUNT``) and the step
  (``SLURM_STEP_ID``): an earlier attempt's lease is taken (a requeue), and so is the same
  step's (torchrun restarting its workers), but another step of the same attempt (a second
  ``srun`` into the same run directory in one allocation) is another job;
- its process is gone (same host, pid not running);
- its heartbeat is older than ``job.lease_timeout_s`` (a crashed node, a killed job).

A job that finds its lease taken over (it was suspended past the timeout and another job
took the directory) stops at the next step without saving (trainer: ``lease lost``).

This relies on the shared filesystem's atomic link and rename (NFS, Lustre, GPFS have both)
and on the hosts' clocks agreeing to well within the timeout.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

from ..confutil import write_atomic

LEASE_NAME = ".lease.json"


class LeaseError(RuntimeError):
    """Another live job holds the run directory."""


def job_identity(env: Optional[dict] = None) -> str:
    """What stays the same when this job restarts: the Slurm job id (a requeue keeps it), or
    torchrun's run id, or (a plain process) host and pid."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    run_id = env.get("TORCHELASTIC_RUN_ID", "")
    if run_id and run_id != "none":  # "none": torchrun's default rendezvous id, shared by unrelated launches
        return f"torchrun:{run_id}"
    if "TORCHELASTIC_RESTART_COUNT" in env:  # torchrun without an id: its agent outlives the workers' restarts
        return f"torchrun:{socket.gethostname()}:{os.getppid()}"
    return f"{socket.gethostname()}:{os.getpid()}"


def job_attempt(env: Optional[dict] = None) -> tuple[Optional[int], Optional[str]]:
    """Under Slurm, (attempt, step): the job's requeue count (SLURM_RESTART_COUNT, 0 before the
    first requeue) and the step (SLURM_STEP_ID; 'batch' in the batch script itself, where
    srun has not set one). (None, None) elsewhere."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_ID"):
        return None, None
    try:
        attempt = int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        attempt = 0
    return attempt, env.get("SLURM_STEP_ID") or "batch"


def this_job() -> tuple[str, Optional[int], Optional[str]]:
    """This process's (job, attempt, step): ``job_identity`` and ``job_attempt``."""
    return (job_identity(), *job_attempt())


def read_lease(run_dir: str | os.PathLike[str]) -> Optional[dict]:
    """The lease's record, None without one, {} for an unreadable file (treated as abandoned)."""
    try:
        record = json.loads((Path(run_dir) / LEASE_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    fields = {"job": str, "host": str, "owner": str, "pid": int, "heartbeat": (int, float)}
    optional = {"attempt": int, "step": str}  # Slurm's (job_attempt); absent in older leases
    if (not isinstance(record, dict) or not all(isinstance(record.get(k), t) for k, t in fields.items())
            or not all(record.get(k) is None or isinstance(record[k], t) for k, t in optional.items())):
        return {}  # not written by a RunLease: as unreadable
    return record


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def takeover_reason(holder: dict, job: str, timeout_s: float, attempt: Optional[int] = None,
                    step: Optional[str] = None) -> Optional[str]:
    """Why ``job`` (at ``attempt`` and ``step``, ``job_attempt``) may take a run directory whose
    lease ``holder`` (``read_lease``) records, or None if it may not."""
    if not holder:
        return "the lease file is unreadable"
    if holder["job"] == job:
        held = holder.get("attempt")
        if held is None or attempt is None:
            return "it is this job's own (a requeue or a restart)"
        if held < attempt:
            return f"it is this job's earlier attempt {held} (a requeue)"
        if held == attempt and holder.get("step") == step:
            return "it is this job step's own (a restart)"
        # another step of the same attempt: a second srun into this run directory, a job of its own
    if holder["host"] == socket.gethostname() and not _pid_running(holder["pid"]):
        return f"its process {holder['pid']} is gone from this host"
    age = time.time() - holder["heartbeat"]
    if age > timeout_s:
        return f"its last heartbeat is {age:.0f} s old (job.lease_timeout_s={timeout_s:g})"
    return None


def refusal(holder: dict, timeout_s: float, run_dir) -> str:
    """The error for a run directory whose lease a live job holds (takeover_reason None)."""
    step = f" step {holder['step']}" if holder.get("step") else ""
    return (f"job.run_dir={run_dir} is in use by job {holder['job']}{step} (host {holder['host']}, "
            f"pid {holder['pid']}, "
            f"heartbeat {time.time() - holder['heartbeat']:.0f} s ago): two jobs in one run directory overwrite each "
            f"other's checkpoints. Wait for that job to end, or use another job.run_dir. If that job is gone, its "
            f"lease counts as abandoned {timeout_s:.0f} s after its last heartbeat (job.lease_timeout_s), or remove "
            f"{Path(run_dir) / LEASE_NAME}")


def lease_problem(run_dir, timeout_s: float, job: Optional[str] = None, attempt: Optional[int] = None,
                  step: Optional[str] = None) -> Optional[str]:
    """Read-only: why this job may not train in ``run_dir`` now, or None (slurm/entry.py check).
    job None: this process's (``job_identity``, ``job_attempt``)."""
    holder = read_lease(run_dir)
    if timeout_s <= 0 or holder is None:
        return None
    if job is None:
        job, attempt, step = this_job()
    if takeover_reason(holder, job, timeout_s, attempt, step) is not None:
        return None
    return refusal(holder, timeout_s, run_dir)


class RunLease:
    """The lease of one job on one run directory (global rank 0 only)."""

    def __init__(self, run_dir, timeout_s: float, job: Optional[str] = None,
                 log: Callable[[str], None] = print, settle_s: float = 0.2, attempt: Optional[int] = None,
                 step: Optional[str] = None):
        """job None: this process's identity, attempt and step (``job_identity``, ``job_attempt``)."""
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LEASE_NAME
        self.timeout_s, self.interval_s = timeout_s, timeout_s / 10
        self.job, self.attempt, self.step = job, attempt, step
        if job is None:
            self.job, self.attempt, self.step = this_job()
        self.token = uuid.uuid4().hex  # this process's hold, even within one job
        self.log, self.settle_s = log, settle_s
        self.lost = threading.Event()
        self.created: list[Path] = []  # directories acquire() made
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.started = time.time()

    def _record(self) -> str:
        return json.dumps({"job": self.job, "attempt": self.attempt, "step": self.step, "host": socket.gethostname(),
                           "pid": os.getpid(), "owner": self.token, "started": self.started,
                           "heartbeat": time.time()}) + "\n"

    def _write(self) -> None:
        write_atomic(self.path, self._record())

    def _create(self) -> bool:
        """Create the lease if there is none, atomically with its content (link fails if it exists)."""
        tmp = self.path.with_name(f"{LEASE_NAME}.{self.token}.tmp")
        tmp.write_text(self._record())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self) -> "RunLease":
        """Take the lease or raise LeaseError (nothing else written); then renew it in a thread."""
        # a run that fails before writing anything (bad data settings) leaves no directory behind
        self.created = [d for d in (self.run_dir, *self.run_dir.parents) if not d.exists()]
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            holder = read_lease(self.run_dir)
            if holder is None:
                if not self._create():
                    continue  # another job created it a moment ago: look at it
            else:
                reason = takeover_reason(holder, self.job, self.timeout_s, self.attempt, self.step)
                if reason is None:
                    raise LeaseError(refusal(holder, self.timeout_s, self.run_dir))
                if holder.get("job") != self.job:
                    self.log(f"[lease] taking over {self.path} from job {holder.get('job')} (host "
                             f"{holder.get('host')}, pid {holder.get('pid')}): {reason}")
                self._write()
            time.sleep(self.settle_s)  # another taker's rename lands within this: the last one wins
            if (read_lease(self.run_dir) or {}).get("owner") == self.token:
                self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
                self._thread.start()
                return self
        raise LeaseError(f"job.run_dir={self.run_dir}: another job keeps taking {self.path}; is a second job "
                         "starting in this run directory?")

    def owned(self) -> bool:
        return (read_lease(self.run_dir) or {}).get("owner") == self.token

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                if not self.owned():  # taken over while this process could not renew it
                    self.lost.set()
                    return
                self._write()
            except OSError as e:  # a filesystem hiccup: the next beat tries again
                self.log(f"[lease] could not renew {self.path}: {e}")

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            if self.owned():
                self.path.unlink()
        except OSError:
            pass
        for d in self.created:  # innermost first; only while empty
            try:
                d.rmdir()
            except OSError:
                break
