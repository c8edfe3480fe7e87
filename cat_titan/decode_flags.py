"""The decode-path options of the generation tools, stated once: their command-line flags
(tools/bench_generate.py, tools/generate.py, tools/bench_targets.py) and the rules that
combine them, which ``cat_titan.infer.bench.SpeedConfig`` applies to its fields too.

Standard library only: bench_targets parses its arguments without importing torch.
"""

from __future__ import annotations

import argparse
from typing import Optional

# How each option is named in a message: as a flag, or as a SpeedConfig field.
FLAGS = dict(fold="--fold-norms", not_lean="drop --no-lean")
FIELDS = dict(fold="fold_norms", not_lean="set lean=True or None")


def add_decode_path_args(p: argparse.ArgumentParser) -> None:
    """--lean/--no-lean and --fold-norms."""
    p.add_argument("--lean", action=argparse.BooleanOptionalAction, default=None,
                   help="each decode block as the lean path: cuBLAS matmuls, RoPE + cache writes + attention in "
                        "one kernel, the residual adds inside the wo and w2 GEMMs (cat_titan.infer.decode_block; "
                        "+0.4-2%% tokens/s at batch 64 on an H100). Default: lean where the step is compiled on CUDA "
                        "(cat_titan.infer.runners.LEAN_BY_DEFAULT, True); --no-lean: the model's ops")
    p.add_argument("--fold-norms", action="store_true",
                   help="the lean path with the norm weights folded into copies of wqkv and w1|w3: the kernels "
                        "apply only the norm's row scale; ~5%% faster at batch 64, more memory (it counts in the "
                        "batch-320 memory ratio)")


def decode_path_argv(lean: Optional[bool], fold_norms: bool) -> list[str]:
    """The flags of ``add_decode_path_args`` that give this choice (for a tool that runs another)."""
    return {True: ["--lean"], False: ["--no-lean"]}.get(lean, []) + (["--fold-norms"] if fold_norms else [])


def lean_requested(lean: Optional[bool], fold_norms: bool) -> bool:
    """Whether the caller asked for the lean path itself (``lean_linears`` before compiling):
    --lean, or --fold-norms, which folds the lean path's norms; otherwise ``compile_step``'s
    default decides."""
    return bool(lean or fold_norms)


def decode_path_error(lean: Optional[bool], fold_norms: bool, names: dict = FLAGS) -> Optional[str]:
    """What is wrong with this combination (None: nothing), in ``names``' spelling (FLAGS or FIELDS)."""
    if fold_norms and lean is False:
        return f"{names['fold']} folds the norms of the lean path's blocks: {names['not_lean']}"
    return None
