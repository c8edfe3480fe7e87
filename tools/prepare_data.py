"""Tokenize text corpora into cat_titan token shards.

    python tools/prepare_data.py INPUTS... --out DIR --tokenizer byte|gpt2|path.tiktoken

INPUTS are text files, folders of them (recursive), .jsonl / .jsonl.gz files (one JSON object
a line) and .parquet files. The result is DIR/manifest.json plus train_*.bin / val_*.bin; see
cat_titan/data/shards.py for the format. Bad inputs exit with status 2 and leave DIR untouched.
--overwrite replaces DIR only if it is prepared data (manifest.json and shard files, nothing else):
any other directory, a training run's above all, is refused with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from cat_titan.data.corpus import SUPPORTED, prepare_corpus
from cat_titan.data.shards import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, DataError
from cat_titan.data.tokenizer import TokenizerError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=f"Supported inputs: {SUPPORTED}."
    )
    parser.add_argument("inputs", nargs="+", help="files and folders to tokenize, in order")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte', a tiktoken name, or a .tiktoken file (default: %(default)s)",
    )
    parser.add_argument("--text-field", default="text", help="text field of jsonl/parquet rows")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    parser.add_argument(
        "--workers", type=int, default=cpus,
        help="tokenizer processes (default: the CPUs this process may use, e.g. a Slurm allocation's)"
    )
    parser.add_argument(
        "--shard-tokens",
        type=int,
        default=DEFAULT_SHARD_TOKENS,
        help="tokens per shard file (default: %(default)s)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="share of whole documents held out for validation (default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an --out that holds prepared data (never any other directory)",
    )
    args = parser.parse_args(argv)
    try:
        manifest = prepare_corpus(
            args.inputs,
            args.out,
            args.tokenizer,
            text_field=args.text_field,
            workers=args.workers,
            shard_tokens=args.shard_tokens,
            val_fraction=args.val_fraction,
            overwrite=args.overwrite,
            progress=True,
        )
    except (DataError, TokenizerError) as e:
        print(f"prepare_data: error: {e}", file=sys.stderr)
        return 2
    totals = ", ".join(
        f"{split}: {s['num_tokens']:,} tokens in {s['num_documents']:,} documents"
        for split, s in manifest["splits"].items()
    )
    print(f"prepare_data: wrote {args.out} ({totals})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
