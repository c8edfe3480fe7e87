"""Run a test body on N real gloo processes (CPU), STYLE 9.

``launch(run_fn, world, *args)`` starts ``world`` spawned processes with torchrun-style
environment variables, calls ``run_fn(rank, world, *args)`` in each, and returns the list
of their return values (pickled through files). A failing rank's traceback is raised in
the test process. Starting processes costs seconds: put many checks in one body.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import traceback
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, port, out_dir, args, env):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    try:
        result = fn(rank, world, *args)
        Path(out_dir, f"rank-{rank}.pkl").write_bytes(pickle.dumps(("ok", result)))
    except BaseException:  # report any failure, including SystemExit, to the parent
        Path(out_dir, f"rank-{rank}.pkl").write_bytes(pickle.dumps(("error", traceback.format_exc())))
        raise


def launch(fn, world: int, *args, timeout: float = 600, env: dict | None = None) -> list:
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, port, out_dir, args, env or {})) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                raise TimeoutError(f"rank {procs.index(p)} of {world} did not finish within {timeout}s")
        results = []
        for r in range(world):
            path = Path(out_dir, f"rank-{r}.pkl")
            if not path.exists():
                raise RuntimeError(f"rank {r} died without a result (exit code {procs[r].exitcode})")
            status, value = pickle.loads(path.read_bytes())
            if status == "error":
                raise RuntimeError(f"rank {r} of {world} failed:\n{value}")
            results.append(value)
        return results
