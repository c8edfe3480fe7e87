"""The ``slurm`` fixture: a real one-node Slurm cluster for this test session.

Installs Debian's slurmctld, slurmd, slurm-client and munge when they are missing (apt-get,
as root), starts munged, ``slurmctld -i`` and ``slurmd -N localhost`` on loopback with a
private configuration (tests/slurm/cluster.py), and stops exactly those daemons at the end
of the session. The tests are skipped, with the reason printed, only where the cluster
cannot exist: not root (slurmd must be), or the packages cannot be installed.

The cluster uses its own ports, munge socket and directories, so an existing Slurm on the
machine is left alone, and two sessions at once each get their own cluster.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from .cluster import LocalSlurm, ensure_installed


def _skip(reason: str):
    print(f"\n[tests/slurm] skipped: {reason}", file=sys.stderr, flush=True)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm():
    if sys.platform != "linux":
        _skip(f"Slurm tests need Linux (this is {sys.platform})")
    if os.geteuid() != 0:
        _skip("Slurm tests start slurmd, which must run as root; run the suite as root (CI does)")
    reason = ensure_installed()
    if reason:
        _skip(reason)
    root = Path(tempfile.mkdtemp(prefix="cat_titan_slurm_"))
    cluster = LocalSlurm(root)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        print(f"\n[tests/slurm] cluster start-up failed; files kept under {root}", file=sys.stderr)
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory):
    """CAT_TITAN_CACHE for the jobs: the embedded corpus is prepared once per session."""
    return tmp_path_factory.mktemp("cat_titan_cache")
