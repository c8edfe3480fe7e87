"""Tests of cat_titan.data; helpers shared by its test modules."""

import base64
from pathlib import Path

# A tiny BPE on top of the 256 bytes: enough to see merges happen.
MERGES = [b"th", b"he", b"the", b" t", b"in", b"ing"]


def write_rank_file(path: Path, merges: list[bytes] = MERGES) -> Path:
    """Write a rank table in tiktoken's .tiktoken format: '<base64 token> <rank>' lines."""
    tokens = [bytes([i]) for i in range(256)] + merges
    lines = [f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)]
    path.write_text("".join(lines))
    return path
