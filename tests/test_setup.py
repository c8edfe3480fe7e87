"""scripts/setup.sh, run for real into a throwaway venv (CAT_TITAN_VENV under tmp_path).

The "user's Python with a CUDA torch" is a copy of this interpreter with its own, empty
site-packages holding a stand-in torch distribution (torch.version.cuda set, pip metadata of
a CUDA build): the real one is gigabytes. setup.sh creates the venv on top of it
(--system-site-packages), as on a GPU machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYVER = f"python{sys.version_info.major}.{sys.version_info.minor}"


def python_with_cuda_torch(root: Path, version: str) -> Path:
    """A base (non-venv) Python under root whose site-packages has a CUDA torch `version`."""
    src_bin = Path(sys._base_executable).resolve()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    base_site = Path(sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})["purelib"])
    if sys.platform != "linux" or stdlib.parent.name != "lib" or base_site.parent != stdlib:
        pytest.skip(f"cannot lay out a copy of this Python ({src_bin}, stdlib {stdlib})")
    (root / "bin").mkdir(parents=True)
    lib = root / "lib" / stdlib.name
    lib.mkdir(parents=True)
    for entry in stdlib.iterdir():  # the standard library, shared; site-packages our own
        if entry.name != base_site.name:
            (lib / entry.name).symlink_to(entry)
    exe = root / "bin" / PYVER
    shutil.copy2(src_bin, exe)
    (root / "bin" / "python3").symlink_to(PYVER)
    site = lib / base_site.name
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("from . import version\n__version__ = version.__version__\n")
    (site / "torch" / "version.py").write_text(f"__version__ = {version!r}\ncuda = '12.6'\n")
    dist = site / f"torch-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n")
    (dist / "INSTALLER").write_text("pip\n")
    (dist / "RECORD").write_text("")
    r = subprocess.run([str(exe), "-c", "import sys, torch; print(sys.prefix); print(torch.__version__)"],
                       capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.split() != [str(root), version]:
        pytest.skip(f"the copy of this Python does not run from {root}: {r.stdout} {r.stderr[-500:]}")
    return root / "bin" / "python3"


def setup_sh(python: Path, venv: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(python), "CAT_TITAN_VENV": str(venv)}
    env.pop("CAT_TITAN_TORCH", None)
    return subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=timeout)


def venv_torch(venv: Path) -> tuple[str, str]:
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import torch, importlib.metadata as m; print(torch.__version__, m.version('torch'))"],
                       capture_output=True, text=True, check=True)
    return tuple(r.stdout.split())


@pytest.mark.slow
def test_setup_never_replaces_a_cuda_torch_that_requirements_reject(tmp_path):
    """A CUDA torch older than cat_titan's torch>=2.11: pip must not install another torch
    into the venv (it did: 2.14.1+cu130 over the user's 2.10.0+cu126); setup fails and says why."""
    py = python_with_cuda_torch(tmp_path / "base", "2.10.0+cu126")
    venv = tmp_path / "venv"
    r = setup_sh(py, venv)
    out = r.stdout + r.stderr
    assert venv_torch(venv) == ("2.10.0+cu126", "2.10.0+cu126"), out[-3000:]
    assert r.returncode != 0 and "CUDA torch 2.10.0+cu126" in r.stderr, out[-3000:]
    assert not (venv / "lib" / PYVER / "site-packages" / "torch").exists(), "a torch was installed into the venv"


@pytest.mark.slow
def test_setup_recreates_a_venv_left_without_pip(tmp_path):
    """A venv whose creation stopped before pip (interrupted, or Debian's python3 without
    python3-venv) is created again, not reused: reusing it failed on every later run."""
    py = python_with_cuda_torch(tmp_path / "base", "2.10.0+cu126")
    venv = tmp_path / "venv"
    subprocess.run([str(py), "-m", "venv", "--without-pip", str(venv)], check=True)
    r = setup_sh(py, venv)
    out = r.stdout + r.stderr
    assert "No module named pip" not in out, out[-3000:]
    assert f"has a CUDA torch: creating {venv}" in out, out[-3000:]
    # On top of the CUDA torch now; the rest as in the test above (pip refuses torch 2.10).
    assert venv_torch(venv) == ("2.10.0+cu126", "2.10.0+cu126"), out[-3000:]
    assert "CUDA torch 2.10.0+cu126" in r.stderr, out[-3000:]
