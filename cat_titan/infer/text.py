"""Token ids -> text, incrementally: each new token's bytes go through a UTF-8 incremental
decoder, so a character split across tokens (a byte-level tokenizer emits one byte of a
multi-byte character at a time; BPE merges can split one too) is printed once it is whole,
never as replacement characters in the middle of a stream.

    detok = Detokenizer(tokenizer)
    for tok in ...:
        sys.stdout.write(detok.push(tok))
    sys.stdout.write(detok.flush())   # an incomplete character at the very end -> U+FFFD

Concatenating ``push`` outputs and ``flush`` equals ``tokenizer.decode(ids)`` (which decodes
the whole byte string with errors='replace').
"""

from __future__ import annotations

import codecs
from typing import Iterable


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.encoding.decode_single_token_bytes(int(token))

    def push(self, token: int) -> str:
        """The text that became complete with this token ('' while a character is partial)."""
        return self._decoder.decode(self.token_bytes(token))

    def flush(self) -> str:
        """Whatever is left (an incomplete character becomes U+FFFD); the decoder is reset."""
        out = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return out

    def decode(self, tokens: Iterable[int]) -> str:
        return "".join(self.push(t) for t in tokens) + self.flush()
