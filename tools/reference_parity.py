#!/usr/bin/env python
"""Check cat_titan against a reference-format file: one line per output, exit 1 on failure.

A file with greedy_prompt/greedy_tokens gets two greedy lines: decoding by full forward
passes ([full-forward]) and by the KV-cache generation path of cat_titan.infer ([cached]).

    python tools/reference_parity.py ../shared/fixtures/reference/cat.safetensors [--device cuda --dtype bf16]
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from cat_titan.parity import TOLERANCE, run_parity  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="reference-format .safetensors files")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--tolerance", type=float, default=None,
                   help=f"max abs logit difference (default {TOLERANCE} for fp32)")
    p.add_argument("--attn-backend", choices=["auto", "flex", "sdpa"], default="auto")
    p.add_argument("--fused-ops", choices=["auto", "on", "off"], default="off")
    a = p.parse_args()
    tol = a.tolerance if a.tolerance is not None else TOLERANCE
    failed = False
    for f in a.files:
        try:
            results = run_parity(f, a.device, DTYPES[a.dtype], tol, a.attn_backend, a.fused_ops)
        except Exception as e:  # a bad file is a failure with a reason, not a traceback
            print(f"{f}: ERROR {type(e).__name__}: {e}")
            failed = True
            continue
        if not results:
            print(f"{f}: ERROR no outputs to check (expected logits* tensors)")
            failed = True
        for r in results:
            status = "ok" if r.ok else "FAIL"
            value = f"{r.max_abs_diff:.3g}" if "greedy" not in r.name else f"{int(r.max_abs_diff)} tokens differ"
            print(f"{Path(f).name} {r.name}: max_abs_diff={value} {status} {r.detail}".rstrip())
            failed |= not r.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
