#!/usr/bin/env python
"""Launch helpers for slurm/train.sbatch and scripts/launch_local.sh.

    python slurm/entry.py check --config F.yaml [key=value ...]
        Validates the config the way train.py will (WORLD_SIZE from the environment), including
        train.py's checks against the run directory (the checkpoint to resume, collisions,
        model shape, another job's lease on it; it reads, never writes), and prints the
        absolute run directory. Exit 2 with the problems listed, so a batch job fails before
        it starts processes on every node.

    python slurm/entry.py torchrun [torchrun arguments] train.py --config F.yaml ...
        torchrun (torch.distributed.run, same arguments), with two changes that a
        preemptible job needs:
        - The exit status says what the trainers did. Plain torchrun exits 1 whenever a
          worker exits non-zero; here a node whose workers stopped with 75 ("checkpoint
          saved, requeue me") exits 75, and one whose workers all failed with the same
          status (2: bad config) exits with it. Any other failure exits 1; torchrun itself
          stopped by SIGTERM/SIGINT/... exits 128 + the signal number.
        - SIGUSR1 is ignored by the launcher process. Slurm delivers a signal sent to a
          step (srun forwarding, scancel -s) to every process of the step; torchrun does not
          handle SIGUSR1, so by default it would die of it and orphan its workers. The
          workers inherit the ignored disposition until the trainer installs its own
          handler, so a warning that arrives during start-up is dropped rather than
          killing a rank; slurm/train.sbatch repeats the warning until the step ends.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path

EXIT_PREEMPTED, EXIT_USAGE = 75, 2
ROOT = Path(__file__).resolve().parents[1]


def check(argv: list[str]) -> int:
    import argparse

    sys.path.insert(0, str(ROOT))
    from cat_titan.config import load_config
    from cat_titan.confutil import ConfigError
    from cat_titan.train.lease import lease_problem
    from cat_titan.train.trainer import preflight_checkpoint

    p = argparse.ArgumentParser(prog="entry.py check")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        # train.py's checks of the run directory (resume target and collisions, model shape and
        # sample stream against the checkpoint): read-only. Not its device checks: this batch
        # host's devices need not be the trainers'.
        preflight_checkpoint(cfg)
        # another job training into this run directory (this job's own lease, from before a
        # requeue, is its to take)
        problem = lease_problem(cfg.job.run_dir, cfg.job.lease_timeout_s)
        if problem:
            raise ConfigError([problem])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(Path(cfg.job.run_dir).resolve())
    return 0


def node_status(exitcodes: list[int]) -> int:
    """One node's exit status from its failed workers' exit codes (successes not listed).

    A rank exits 75 only after the checkpoint is complete on every rank (the trainer's
    save ends with a barrier after the marker is written), so one 75 is enough: the other
    ranks may have been stopped by torchrun's clean-up a moment later."""
    if not exitcodes:
        return 0
    if EXIT_PREEMPTED in exitcodes:
        return EXIT_PREEMPTED
    if len(set(exitcodes)) == 1 and exitcodes[0] > 0:
        return exitcodes[0]
    return 1


def torchrun(argv: list[str]) -> int:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # before importing torch: that takes seconds
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        status = node_status([f.exitcode for f in e.failures.values()])
        print(f"[entry] workers failed; exit status {status}\n{e}", file=sys.stderr, flush=True)
        return status
    except SignalException as e:
        print(f"[entry] torchrun stopped by {e.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(e.sigval)
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("check", "torchrun"):
        print(__doc__, file=sys.stderr)
        return EXIT_USAGE
    return check(argv[1:]) if argv[0] == "check" else torchrun(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
