#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv and installs cat_titan into it.
#
# torch: a CUDA torch already importable from $PYTHON is reused as it is (the venv sees it
# through --system-site-packages) and is never replaced: setup fails instead where a requirement
# rejects it (cat_titan needs torch>=2.11). Otherwise the CPU torch 2.13.0 is
# installed (CAT_TITAN_TORCH overrides the requirement, e.g. "torch==2.11.0"; add an index with
# PIP_EXTRA_INDEX_URL as usual). Re-running is cheap: a stamp of pyproject.toml skips pip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${CAT_TITAN_VENV:-.venv}
TORCH_REQ=${CAT_TITAN_TORCH:-torch==2.13.0}

has_cuda_torch() { "$1" - <<'PY' 2>/dev/null
import sys
try:
    import torch
except Exception:
    sys.exit(1)
sys.exit(0 if torch.version.cuda else 1)
PY
}

# A venv without pip (its creation failed or was interrupted, e.g. Debian's python3 without
# python3-venv) is created again: reusing it would fail on every later run.
if ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    if has_cuda_torch "$PYTHON"; then
        echo "[setup] $PYTHON has a CUDA torch: creating $VENV on top of it (torch is not reinstalled)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        echo "[setup] creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
PY="$VENV/bin/python"

stamp="$VENV/.cat_titan_stamp"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$PY" -c "import torch, cat_titan" 2>/dev/null; then
    exit 0
fi

keep=()
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_REQ"
    "$PY" -m pip install -q "$TORCH_REQ"
elif has_cuda_torch "$PY"; then
    cuda_torch=$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')
    echo "[setup] keeping the CUDA torch $cuda_torch"
    # Pinned, so that pip fails instead of replacing it when a requirement (torch>=2.11, a
    # pip constraint) rejects it: it would install another build in the venv that shadows it.
    keep=("torch==$cuda_torch")
fi
if ! "$PY" -m pip install -q -e '.[test]' ${keep[@]+"${keep[@]}"}; then
    [ ${#keep[@]} -eq 0 ] || echo "[setup] error: pip failed; it may not replace the CUDA torch $cuda_torch of" \
        "$PYTHON. If it names a conflict on torch, upgrade torch there (cat_titan needs torch>=2.11)" \
        "or run with PYTHON=<a Python without torch> to get the CPU build" >&2
    exit 1
fi
echo "$want" > "$stamp"
echo "[setup] ready: $("$PY" -c 'import torch; print("torch", torch.__version__)')"
