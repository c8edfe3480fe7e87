"""Run cat_titan's Triton kernels on CPU in Triton's interpreter.

TRITON_INTERPRET=1 must be set before a kernel is defined, so each check is a Python
program run in a subprocess that prints its results as JSON on its last line.
``INTERPRETABLE, WHY_NOT``: whether this install can, and the skip reason if not. Triton
3.6's interpreter (the GPU machine's) fails on runtime loop bounds (TypeError: only
0-dimensional arrays can be converted to Python scalars); 3.9 (CI's CPU install) runs every
kernel here. The compiled kernels are checked by the CUDA tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

try:
    import triton
except ImportError:  # pragma: no cover - CPU-only installs without triton
    triton = None


def _interpretable() -> tuple[bool, str]:
    if triton is None:
        return False, "triton is not installed: the kernels cannot be interpreted"
    major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    if (major, minor) < (3, 9):
        return False, f"triton {triton.__version__}'s interpreter cannot run the kernels (needs >= 3.9)"
    return True, ""


INTERPRETABLE, WHY_NOT = _interpretable()


def start(code: str, *args: str) -> subprocess.Popen:
    """Start ``python -c code args`` in the interpreter (results come back through ``result``)."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def result(proc: subprocess.Popen, timeout: float = 900):
    """The JSON the check printed last; fails the test on an error or after ``timeout`` s."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the interpreted check did not finish in {timeout} s: {err[-3000:]}")
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def run(code: str, *args: str, timeout: float = 900):
    return result(start(code, *args), timeout)
