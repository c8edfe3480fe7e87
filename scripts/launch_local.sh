#!/usr/bin/env bash
# One machine, several processes: torchrun --standalone with one process per GPU (one
# process on a machine without GPUs).
#
#   scripts/launch_local.sh CONFIG.yaml [key.path=value ...]
#   NPROC=4 scripts/launch_local.sh configs/cat_150m.yaml job.run_dir=runs/cat_150m
#
# Knobs: NPROC (processes; default: visible GPUs, else 1), CAT_TITAN_PYTHON (default
# .venv/bin/python, else python3), CAT_TITAN_TORCHRUN_ARGS (extra torchrun options).
# Exit status as train.py's: 0 finished, 2 bad config, 3 stopped on a non-finite loss
# (training.nonfinite=stop), 75 stopped after saving a checkpoint
# (run the same command again to resume). To stop with a checkpoint, send SIGUSR1 to any one
# rank (pkill -USR1 -f -o 'train.py --config'; the ranks agree and all save); torchrun starts
# each rank in its own session, so signalling this script's process group does not reach them.
# SIGTERM to torchrun forwards it and the ranks save, but torchrun then exits 143.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${CAT_TITAN_PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then CAT_TITAN_PYTHON=$ROOT/.venv/bin/python; else CAT_TITAN_PYTHON=python3; fi
fi
if [ $# -lt 1 ]; then
    echo "usage: scripts/launch_local.sh CONFIG.yaml [key.path=value ...]" >&2
    exit 2
fi
CONFIG=$1
shift
if [ -z "${NPROC:-}" ] || [ "$NPROC" = auto ]; then
    NPROC=$("$CAT_TITAN_PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
fi
export PYTHONUNBUFFERED=1
# shellcheck disable=SC2086  # extra torchrun options are split on spaces on purpose
exec "$CAT_TITAN_PYTHON" "$ROOT/slurm/entry.py" torchrun --standalone --nproc-per-node="$NPROC" \
    ${CAT_TITAN_TORCHRUN_ARGS:-} "$ROOT/train.py" --config "$CONFIG" "$@"
