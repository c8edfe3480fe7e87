#!/usr/bin/env python
"""Export the model weights of a training checkpoint to one .safetensors file.

    python tools/export.py RUN_OR_CHECKPOINT_DIR OUT.safetensors [--dtype bf16|fp32] [--format native|reference]

A run directory (or its checkpoints/ folder) means its newest complete checkpoint. Runs on CPU,
without GPUs or a process group, whatever layout (FSDP, HSDP, TP) wrote the checkpoint;
optimizer state is left out.
The file's metadata holds the model arguments and tokenizer, so
``cat_titan.load_pretrained(OUT)`` rebuilds the model from it alone. ``--format reference``
writes the reference implementation's names and ``configs`` metadata
(tools/reference_parity.py's loader reads it). Exit status 2 on a bad checkpoint or format.
"""

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cat_titan.export import DTYPES, FORMATS, ExportError, export  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="run directory or its checkpoints/ folder (the newest complete checkpoint), or "
                                  "a checkpoints/step-N directory")
    p.add_argument("out", help="output .safetensors file (replaced atomically if it exists)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="floating dtype of the weights (fp32)")
    p.add_argument("--format", choices=FORMATS, default="native", help="tensor names and layout (native)")
    a = p.parse_args(argv)
    try:
        with warnings.catch_warnings():  # restores showwarning: library callers keep their warnings
            # a skipped incomplete checkpoint is news for the user, not a code location
            warnings.showwarning = lambda message, *_, **__: print(f"note: {message}", file=sys.stderr)
            info = export(a.source, a.out, dtype=a.dtype, fmt=a.format)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported step {info['step']} of {info['source']}: {info['tensors']} tensors, "
          f"{info['parameters'] / 1e6:.2f}M parameters, {info['dtype']}, {info['format']} format, "
          f"{info['bytes'] / 1e6:.1f} MB -> {info['path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
