"""The decode-path options of the generation tools, stated once: their command-line flags
(tools/bench_generate.py, tools/generate.py, tools/bench_targets.py) and the rules that
combine them, which ``cat_titan.infer.bench.SpeedConfig`` applies to its fields too.

Standard library only: bench_targets parses its arguments without importing torch.
"""

from __future__ import annotations

import argparse
from typing import Optional

# How each option is named in a message: as a flag, or as a SpeedConfig field.
FLAGS = dict(fused="--fused-linear", lean="--lean", fold="--fold-norms", tuned="--tuned-gemms",
             not_lean="drop --no-lean", not_fused="drop --fused-linear")
FIELDS = dict(fused="fused_linear", lean="lean", fold="fold_norms", tuned="tuned_gemms",
              not_lean="set lean=True or None", not_fused="set fused_linear=False")


def add_decode_path_args(p: argparse.ArgumentParser, fused: bool = True, tuned: bool = True) -> None:
    """--lean/--no-lean, --fold-norms and (tuned) --tuned-gemms; ``fused``: the tool also has
    --fused-linear (its own flag), which the help texts then mention."""
    p.add_argument("--lean", action=argparse.BooleanOptionalAction, default=None,
                   help="each decode block as the lean path: cuBLAS matmuls, RoPE + cache writes + attention in "
                        "one kernel, the residual adds inside the wo and w2 GEMMs (cat_titan.infer.decode_block; "
                        "~2%% faster at batch 64 on an H100). Default: lean where the step is compiled on CUDA if "
                        "cat_titan.infer.runners.LEAN_BY_DEFAULT (not yet: its CUDA suites are to run first); "
                        "--no-lean: the model's ops")
    p.add_argument("--fold-norms", action="store_true",
                   help="the lean path" + (" (or --fused-linear)" if fused else "") + " with the norm weights folded "
                        "into copies of wqkv and w1|w3" + (" (--fused-linear: and the head)" if fused else "") +
                        ": the kernels apply only the norm's row scale; ~5%% faster at batch 64, more memory (it "
                        "counts in the batch-320 memory ratio)")
    if tuned:
        p.add_argument("--tuned-gemms", action="store_true",
                       help="the lean path's matmuls and the head's as cuBLASLt algorithms timed per shape before "
                            "the first step (cat_titan.infer.lt_gemm; experimental, not yet run on a GPU)")


def decode_path_error(lean: Optional[bool], fold_norms: bool, tuned_gemms: bool = False, fused_linear: bool = False,
                      names: dict = FLAGS) -> Optional[str]:
    """What is wrong with this combination (None: nothing), in ``names``' spelling (FLAGS or FIELDS)."""
    n = names
    if fused_linear and lean:
        return f"{n['fused']} and {n['lean']} are two decode paths; choose one"
    if fold_norms and not fused_linear and lean is False:
        return f"{n['fold']} folds the norms of the lean path's blocks: {n['not_lean']}"
    if tuned_gemms and (fused_linear or lean is False):
        return (f"{n['tuned']} runs the lean path's matmuls: "
                f"{n['not_fused'] if fused_linear else n['not_lean']}")
    return None
