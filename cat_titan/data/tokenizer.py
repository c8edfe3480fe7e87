"""Tokenizers: tiktoken encodings by name, from a local ``.tiktoken`` file, or byte-level.

Every tokenizer is a real ``tiktoken.Encoding`` behind a small wrapper that fixes the
conventions the data pipeline relies on: one end-of-text id (``eot_id``) that ordinary text can
never produce, lossless-or-replacing decode, and an ``identity()`` that a shard manifest stores
so that data and model can be checked against each other later.

Specs accepted by :func:`get_tokenizer`:

- ``"byte"``: 256 byte tokens plus ``<|endoftext|>`` = 256 (vocab 257); needs no file.
- a tiktoken encoding name (``gpt2``, ``r50k_base``, ``cl100k_base``, ``o200k_base``, ...):
  needs tiktoken's cache (``TIKTOKEN_CACHE_DIR``) or network on first use.
- a local file: ``path/to/ranks.tiktoken`` or ``file:path/to/ranks`` (tiktoken's base64 rank
  format); ``<|endoftext|>`` gets the id after the last rank.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import os
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken
import tiktoken.load

ENDOFTEXT = "<|endoftext|>"

# cl100k_base's split regex: a good default for rank files that come without one.
CL100K_PAT_STR = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)

_SPEC_FORMS = (
    "'byte', a tiktoken encoding name ({names}), a path ending in '.tiktoken', "
    "or 'file:<path>'"
)


class TokenizerError(ValueError):
    """A tokenizer spec that cannot be resolved; the message names the value and the fix."""


class TokenizerUnavailableError(TokenizerError):
    """A known tiktoken encoding whose rank file is neither cached nor downloadable."""


class Tokenizer:
    """A tiktoken encoding with the pipeline's conventions.

    Pickles as its spec (re-created, and cached, in the receiving process), so worker
    processes never ship rank tables around.
    """

    def __init__(self, spec: str, encoding: tiktoken.Encoding, name: str):
        self.spec = spec
        self.name = name
        self.encoding = encoding
        self.eot_id: int = encoding.encode_single_token(ENDOFTEXT)
        self.vocab_size: int = encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        # encode_ordinary: special-token strings in the text are plain text, never the eot id.
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: Iterable[str], num_threads: int = 1) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int]) -> str:
        # A window cut out of a token stream may split a multi-byte character.
        return self.encoding.decode(list(ids), errors="replace")

    @functools.cached_property
    def sha256(self) -> str:
        """Hash of everything that decides the ids: ranks (in .tiktoken form), regex, specials.

        ``_mergeable_ranks``/``_pat_str``/``_special_tokens`` are the attributes tiktoken's own
        README uses to extend an encoding; they are the only way to read them back.
        """
        ranks = sorted(self.encoding._mergeable_ranks.items(), key=lambda kv: kv[1])
        h = hashlib.sha256()
        h.update(b"".join(base64.b64encode(tok) + b" %d\n" % rank for tok, rank in ranks))
        h.update(b"pat_str " + self.encoding._pat_str.encode() + b"\n")
        for tok, rank in sorted(self.encoding._special_tokens.items(), key=lambda kv: kv[1]):
            h.update(b"special %s %d\n" % (tok.encode(), rank))
        return h.hexdigest()

    def identity(self) -> dict:
        """JSON-safe description stored in shard manifests and compared against later."""
        return {
            "spec": self.spec,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eot_id": self.eot_id,
            "sha256": self.sha256,
        }

    def __reduce__(self):
        return get_tokenizer, (self.spec,)

    def __repr__(self) -> str:
        return f"Tokenizer(spec={self.spec!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


def _byte_encoding() -> tiktoken.Encoding:
    return tiktoken.Encoding(
        name="byte",
        pat_str=CL100K_PAT_STR,
        mergeable_ranks={bytes([i]): i for i in range(256)},
        special_tokens={ENDOFTEXT: 256},
    )


def _file_encoding(path: Path) -> tiktoken.Encoding:
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    except Exception as e:  # malformed base64 / rank lines
        raise TokenizerError(
            f"cannot read tiktoken rank file {path}: {e}. Expected one '<base64 token> <rank>' "
            "pair per line, as in tiktoken's .tiktoken files"
        ) from e
    if not ranks:
        raise TokenizerError(f"tiktoken rank file {path} holds no ranks")
    # tiktoken's Rust core panics (a BaseException, mid-preparation) on either defect below:
    # encoding any text that holds an unranked byte, or building an encoding with shared ranks.
    missing = [i for i in range(256) if bytes([i]) not in ranks]
    if missing:
        raise TokenizerError(
            f"tiktoken rank file {path} lacks {len(missing)} of the 256 single-byte tokens (the "
            f"first: byte {missing[0]}), so text holding those bytes cannot be encoded; a "
            "byte-level BPE rank file must rank every byte: add the missing ones"
        )
    if len(set(ranks.values())) != len(ranks):
        seen: dict[int, bytes] = {}
        tok, rank = next((t, r) for t, r in ranks.items() if seen.setdefault(r, t) != t)
        raise TokenizerError(
            f"tiktoken rank file {path} gives rank {rank} to both {seen[rank]!r} and {tok!r}; "
            "every token needs its own rank"
        )
    return tiktoken.Encoding(
        name=path.stem,
        pat_str=CL100K_PAT_STR,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: max(ranks.values()) + 1},
    )


def _tiktoken_cache_dir() -> str:
    """Where tiktoken looks for downloaded files, as tiktoken.load.read_file_cached decides
    ('' turns its cache off)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return os.environ[var]
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _named_encoding(name: str) -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # network/cache failures surface as requests/OSError/ValueError
        # tiktoken caches a file under the SHA-1 of its URL, not under its own name: a rank file
        # copied into TIKTOKEN_CACHE_DIR as e.g. cl100k_base.tiktoken is never found.
        url, cache = getattr(getattr(e, "request", None), "url", None), _tiktoken_cache_dir()
        where = ""
        if url and cache:
            sha1 = hashlib.sha1(url.encode()).hexdigest()
            where = f" The missing file is {url}; tiktoken reads it from {os.path.join(cache, sha1)}."
        elif not cache:
            where = " TIKTOKEN_CACHE_DIR is empty, which turns tiktoken's cache off."
        raise TokenizerUnavailableError(
            f"tiktoken encoding {name!r} could not be loaded ({type(e).__name__}: {e}). "
            f"It needs its rank files in tiktoken's cache (TIKTOKEN_CACHE_DIR) or network access "
            f"on first use.{where} To fill a cache for an offline machine, run "
            f"TIKTOKEN_CACHE_DIR=DIR python -c \"import tiktoken; tiktoken.get_encoding('{name}')\" "
            f"where there is network and set TIKTOKEN_CACHE_DIR=DIR here. Offline, use tokenizer "
            f"'byte' or a local '.tiktoken' rank file instead."
        ) from e


def get_tokenizer(spec: str) -> Tokenizer:
    """Resolve a tokenizer spec (see the module docstring); cached per process."""
    if not isinstance(spec, str) or not spec:
        raise TokenizerError(f"tokenizer spec must be a non-empty string, got {spec!r}")
    if spec.startswith("file:") or spec.endswith(".tiktoken"):
        path = Path(spec.removeprefix("file:")).expanduser()
        if not path.is_file():
            raise TokenizerError(
                f"tokenizer file {path} (from spec {spec!r}) does not exist; a file spec must "
                "name an existing tiktoken rank file"
            )
        # The absolute path is the spec: it re-creates the tokenizer in any working directory,
        # and a relative path never hits the cache entry of another directory's file.
        return _load(f"file:{path.resolve()}")
    if spec == "byte" or spec in tiktoken.list_encoding_names():
        return _load(spec)
    raise TokenizerError(
        f"unknown tokenizer spec {spec!r}; use "
        + _SPEC_FORMS.format(names=", ".join(tiktoken.list_encoding_names()))
    )


@functools.lru_cache(maxsize=16)
def _load(spec: str) -> Tokenizer:
    """Build a tokenizer from a validated, normalised spec (rank tables are worth caching)."""
    if spec == "byte":
        return Tokenizer(spec, _byte_encoding(), "byte")
    if spec.startswith("file:"):
        path = Path(spec.removeprefix("file:"))
        return Tokenizer(spec, _file_encoding(path), path.stem)
    return Tokenizer(spec, _named_encoding(spec), spec)
