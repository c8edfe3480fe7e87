"""A real one-node Slurm cluster on loopback, started by hand for the tests.

``LocalSlurm(root).start()`` writes a munge key and a cgroup-free ``slurm.conf`` under
``root`` and starts ``munged`` (as the munge user), ``slurmctld -i`` and ``slurmd -N
localhost`` in the foreground, as children of this process; ``stop()`` cancels what is
still queued and stops exactly those three processes, by PID. Client commands find the
cluster through ``SLURM_CONF`` (``env()``).

Everything is private to ``root``: the munge socket and key, the state and spool
directories, the pid and log files, and the two TCP ports (free ports picked at start, not
the 6817/6818 defaults), so a system Slurm or a second test session on the same machine is
neither disturbed nor reused.

``ensure_installed()`` installs Debian's slurmctld, slurmd, slurm-client and munge with
apt-get when they are missing (root only), with service start-up denied during the
installation, and returns a reason string when that is impossible.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo"]
POLICY_RC = Path("/usr/sbin/policy-rc.d")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


def _apt(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(["apt-get", *args], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def ensure_installed(timeout: float = 600) -> Optional[str]:
    """None when the Slurm and munge binaries are present (installing them if needed), else
    why they cannot be."""
    if not missing_binaries():
        return None
    if os.geteuid() != 0:
        return f"Slurm binaries {missing_binaries()} missing and not root (cannot apt-get install {PACKAGES})"
    if shutil.which("apt-get") is None:
        return f"Slurm binaries {missing_binaries()} missing and no apt-get to install {PACKAGES}"
    # Debian packages start their services on installation; without systemd that would start
    # a system munged/slurmctld next to ours. policy-rc.d (exit 101) denies it, as in images.
    own_policy = not POLICY_RC.exists()
    if own_policy:
        POLICY_RC.write_text("#!/bin/sh\n# cat_titan tests: no service start during apt-get install\nexit 101\n")
        POLICY_RC.chmod(0o755)
    try:
        install = ["install", "-y", "-q", "--no-install-recommends", *PACKAGES]
        r = _apt(install, timeout)
        if r.returncode != 0:  # a fresh machine may have no package lists yet
            u = _apt(["update", "-q"], timeout)
            r = _apt(install, timeout) if u.returncode == 0 else u
        if r.returncode != 0:
            return f"apt-get could not install {PACKAGES} (exit {r.returncode}): {(r.stderr or r.stdout)[-600:]}"
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"apt-get could not install {PACKAGES}: {e}"
    finally:
        if own_policy:
            POLICY_RC.unlink(missing_ok=True)
    if missing_binaries():
        return f"installed {PACKAGES} but {missing_binaries()} are still not on PATH"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path, kill_wait: int = 5):
        self.root = Path(root)
        self.kill_wait = kill_wait
        self.procs: dict[str, subprocess.Popen] = {}
        self.conf = self.root / "slurm.conf"
        # Job ids differ between clusters, so ports derived from them (the rendezvous port
        # of slurm/train.sbatch) differ between test sessions running side by side.
        self.first_job_id = random.randrange(1000, 1_000_000)

    # -- configuration ---------------------------------------------------------------------
    def _write_files(self) -> None:
        munge_user = pwd.getpwnam("munge")
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o755)  # munged (as munge) must reach its directory below
        mdir = self.root / "munge"
        mdir.mkdir()
        mdir.chmod(0o711)  # munged: the socket's directory must be searchable by everyone
        key = mdir / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        for p in (mdir, key):
            os.chown(p, munge_user.pw_uid, munge_user.pw_gid)
        for d in ("state", "spool", "log"):
            (self.root / d).mkdir()
        ctld_port, d_port = free_port(), free_port()
        while d_port == ctld_port:
            d_port = free_port()
        r = self.root
        self.conf.write_text(f"""\
# Written by tests/slurm/cluster.py: one node on loopback, no cgroups, no accounting.
ClusterName=cattitantest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={mdir}/munge.socket
CryptoType=crypto/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
FirstJobId={self.first_job_id}
KillWait={self.kill_wait}
InactiveLimit=0
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")

    def env(self, **extra: str) -> dict:
        """This process's environment for client commands and jobs: our SLURM_CONF, and none
        of the SLURM_* variables of a job this test session might itself run in."""
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        return {**base, "SLURM_CONF": str(self.conf), **extra}

    # -- processes -------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], **kw) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self.procs[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            env=self.env(), start_new_session=True, **kw)
        log.close()

    def _check_alive(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.root / "log" / f"{name}.out").read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{name} exited with status {p.returncode} during start-up:\n{tail}\n"
                                   f"(logs under {self.root / 'log'})")

    def start(self, timeout: float = 60) -> "LocalSlurm":
        self._write_files()
        m = self.root / "munge"
        self._spawn("munged", ["munged", "--foreground", f"--socket={m}/munge.socket", f"--key-file={m}/munge.key",
                               f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log",
                               f"--seed-file={m}/munged.seed"], user="munge", group="munge", extra_groups=[])
        deadline = time.time() + timeout
        while not (m / "munge.socket").exists():
            self._check_alive()
            if time.time() > deadline:
                raise RuntimeError(f"munged did not create its socket within {timeout}s")
            time.sleep(0.05)
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
        while True:
            self._check_alive()
            r = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            if r.returncode == 0 and r.stdout.strip() in ("idle", "mixed", "allocated"):
                return self
            if time.time() > deadline:
                raise RuntimeError(f"the node did not become idle within {timeout}s (sinfo: {r.stdout.strip()!r} "
                                   f"{r.stderr.strip()!r}); logs under {self.root / 'log'}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job of this cluster, then stop our daemons (slurmd, slurmctld, munged)."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--user", pwd.getpwuid(os.geteuid()).pw_name], check=False)
            deadline = time.time() + self.kill_wait + 15
            while time.time() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    # -- client commands -------------------------------------------------------------------
    def run(self, argv: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, env=self.env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()}")
        return r

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        out = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        fields = {}
        for tok in out.split():
            k, sep, v = tok.partition("=")
            if sep:
                fields[k] = v
        return fields

    def daemon_log(self, name: str, tail: int = 3000) -> str:
        p = self.root / "log" / f"{name}.log"
        return p.read_text(errors="replace")[-tail:] if p.exists() else ""
