"""Corpus preparation: read inputs, tokenize in parallel, write shards; the embedded corpus.

:func:`prepare_corpus` is what ``tools/prepare_data.py`` runs: inputs are text files, folders
of them (recursive), ``.jsonl``/``.jsonl.gz`` (one JSON object a line) and ``.parquet`` (a text
column). Documents keep input order whatever the number of workers, so the shards are the same
bytes for any ``workers``.

:func:`ensure_corpus` gives training a corpus with no download: the running Python's own
standard-library sources (about 12 MB of ``.py`` on CPython 3.11 without its test suites),
prepared once into a cache directory and reused by every later run, rank and job.
"""

from __future__ import annotations

import collections
import fcntl
import gzip
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cat_titan.data.shards import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    DataError,
    check_out_dir,
    corpus_lock,
    dtype_for_vocab,
    first_few,
    write_shards,
)
from cat_titan.data.tokenizer import Tokenizer, get_tokenizer

logger = logging.getLogger(__name__)

TEXT_EXTENSIONS = frozenset(
    ".txt .text .md .markdown .rst .tex .py .pyi .c .h .cc .cpp .hpp .java .js .ts .go .rs .sh"
    .split()
)
SUPPORTED = "text files (" + " ".join(sorted(TEXT_EXTENSIONS)) + "), .jsonl, .jsonl.gz, .parquet"

# Documents per task sent to a worker: big enough to amortise pickling, small enough to keep
# every worker busy and memory bounded.
_CHUNK_CHARS = 1 << 20
_CHUNK_DOCS = 1024


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "text" | "jsonl" | "parquet"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return "text" if path.suffix.lower() in TEXT_EXTENSIONS else None


def collect_inputs(
    inputs: Sequence[str | os.PathLike], skipped: list[Path] | None = None
) -> list[Source]:
    """Expand inputs into files in a deterministic order; folders are walked sorted.

    Inside folders, hidden entries and unsupported files are skipped (the latter are appended
    to ``skipped`` if given); a file named directly must be supported.
    """
    if not inputs:
        raise DataError("no inputs given; pass files or folders of " + SUPPORTED)
    sources: list[Source] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = []
            for dirpath, dirnames, filenames in os.walk(path):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                for name in sorted(filenames):
                    file = Path(dirpath) / name
                    if name.startswith("."):
                        continue
                    if kind := _kind(file):
                        found.append(Source(file, kind))
                    elif skipped is not None:
                        skipped.append(file)
            if not found:
                raise DataError(f"input folder {path} holds no supported files ({SUPPORTED})")
            sources += found
        elif path.is_file():
            kind = _kind(path)
            if kind is None:
                raise DataError(f"unsupported input file {path}; supported: {SUPPORTED}")
            sources.append(Source(path, kind))
        else:
            raise DataError(f"input {path} does not exist")
    # A file read twice (named twice, or named and inside a named folder) is two documents that
    # may fall into different splits: validation text the model trained on.
    seen: dict[Path, Path] = {}
    for src in sources:
        key = src.path.resolve()
        if key in seen:
            raise DataError(
                f"input file {src.path} is read twice (also as {seen[key]}): its documents would "
                "be duplicated, possibly into both train and val; list each file or folder once"
            )
        seen[key] = src.path
    return sources


def _read_text(path: Path) -> str:
    # A stray invalid byte should not cost the whole document.
    return path.read_bytes().decode("utf-8", errors="replace")


def _check_text(value, where: str, field: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, not a string")


def _read_jsonl(path: Path, field: str) -> Iterator[str | None]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e})") from e
            if not isinstance(obj, dict) or field not in obj:
                keys = ", ".join(map(repr, obj)) if isinstance(obj, dict) else type(obj).__name__
                raise DataError(
                    f"{where}: no text field {field!r} (found: {keys}); pass --text-field NAME"
                )
            yield _check_text(obj[field], where, field)


def _read_parquet(path: Path, field: str) -> Iterator[str | None]:
    import pyarrow.parquet as pq  # only parquet inputs pay for the import

    pf = pq.ParquetFile(path)
    if field not in pf.schema_arrow.names:
        raise DataError(
            f"{path}: no text column {field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
            "pass --text-field NAME"
        )
    for batch in pf.iter_batches(columns=[field], batch_size=_CHUNK_DOCS):
        for value in batch.column(0).to_pylist():
            yield _check_text(value, str(path), field)


def iter_texts(sources: Iterable[Source], text_field: str = "text") -> Iterator[str]:
    """Documents in input order; empty and null texts are skipped (they carry no tokens)."""
    for src in sources:
        if src.kind == "text":
            texts: Iterable[str | None] = (_read_text(src.path),)
        elif src.kind == "jsonl":
            texts = _read_jsonl(src.path, text_field)
        else:
            texts = _read_parquet(src.path, text_field)
        yield from (t for t in texts if t)


def _chunks(texts: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode_chunk(tok: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    # The shard dtype keeps arrays small on their way back from a worker process.
    dtype = DTYPES[dtype_for_vocab(tok.vocab_size)]
    return [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(texts)]


_worker_tokenizer: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = get_tokenizer(spec)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _encode_chunk(_worker_tokenizer, texts)


def tokenize_texts(texts: Iterable[str], tok: Tokenizer, workers: int = 1) -> Iterator[np.ndarray]:
    """Token ids of each text, in order; ``workers > 1`` encodes chunks in worker processes.

    At most ``2 * workers`` chunks are in flight (``Pool.imap`` would read the whole input
    ahead into its task queue). Workers are spawned, not forked: the parent may hold threads
    (tiktoken's, torch's) whose locks a fork would copy.
    """
    if workers <= 1:
        for chunk in _chunks(texts):
            yield from _encode_chunk(tok, chunk)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tok.spec,)) as pool:
        pending: collections.deque = collections.deque()
        for chunk in _chunks(texts):
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class _Progress:
    """Counts documents, text and tokens on stderr: a live line on a TTY, else every 30 s;
    also says which input files were skipped."""

    def __init__(self, enabled: bool):
        self.enabled, self.stream = enabled, sys.stderr
        self.live = enabled and self.stream.isatty()
        self.interval = 0.2 if self.live else 30.0
        self.docs = self.chars = self.tokens = 0
        self.start = self.last = time.monotonic()

    def texts(self, texts: Iterable[str]) -> Iterator[str]:
        for text in texts:
            self.chars += len(text)
            yield text

    def docs_out(self, docs: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for doc in docs:
            self.docs += 1
            self.tokens += doc.size
            now = time.monotonic()
            if self.enabled and now - self.last >= self.interval:
                self.last = now
                self._print(end="\r" if self.live else "\n")
            yield doc

    def _print(self, end: str) -> None:
        secs = max(time.monotonic() - self.start, 1e-9)
        self.stream.write(
            f"prepare_data: {self.docs:,} docs, {self.chars / 1e6:,.1f}M chars, "
            f"{self.tokens / 1e6:,.2f}M tokens, {self.chars / 1e6 / secs:,.1f}M chars/s, "
            f"{secs:,.0f}s" + end
        )
        self.stream.flush()

    def skipped(self, files: Sequence[Path]) -> None:
        # a file left out silently looks like a file tokenized
        if self.enabled and files:
            self.stream.write(
                f"prepare_data: skipped {len(files)} file{'s' * (len(files) > 1)} with unsupported "
                f"extensions: {first_few(files)}\n"
            )
            self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._print(end="\n")


def prepare_corpus(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    tokenizer_spec: str,
    *,
    text_field: str = "text",
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    overwrite: bool = False,
    progress: bool = False,
) -> dict:
    """Tokenize ``inputs`` into a shard directory ``out_dir``; return its manifest.

    Everything checkable up front (inputs, tokenizer, output) is checked before any work; an
    error found while reading leaves ``out_dir`` untouched (``write_shards`` is atomic).
    """
    tok = get_tokenizer(tokenizer_spec)
    skipped: list[Path] = []
    sources = collect_inputs(inputs, skipped)
    check_out_dir(out_dir, overwrite)
    report = _Progress(progress)
    report.skipped(skipped)
    texts = report.texts(iter_texts(sources, text_field))
    docs = report.docs_out(tokenize_texts(texts, tok, workers))
    manifest = write_shards(
        docs,
        out_dir,
        tok.identity(),
        shard_tokens=shard_tokens,
        val_fraction=val_fraction,
        overwrite=overwrite,
        metadata={
            "inputs": [str(p) for p in inputs],
            "num_files": len(sources),
            "text_field": text_field,
        },
    )
    report.finish()
    return manifest


# ---------------------------------------------------------------------------------------------
# The embedded corpus

# Test suites are skipped: they would more than double the size (31 MB) with repetitive code.
_STDLIB_SKIP_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)


def stdlib_files(max_bytes: int | None = None) -> list[Path]:
    """The running Python's standard-library ``.py`` files, in a fixed order.

    ``max_bytes`` keeps the files up to (and including) the one that reaches that many bytes.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP_DIRS)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            if max_bytes is not None and total >= max_bytes:
                return files
            file = Path(dirpath) / name
            files.append(file)
            total += file.stat().st_size
    return files


CORPORA: dict[str, Callable[[int | None], list[Path]]] = {"stdlib": stdlib_files}


def default_cache_dir() -> Path:
    return Path(os.environ.get("CAT_TITAN_CACHE") or Path.home() / ".cache" / "cat_titan")


def ensure_corpus(
    name: str = "stdlib",
    tokenizer_spec: str = "byte",
    cache_dir: str | os.PathLike | None = None,
    *,
    max_bytes: int | None = None,
    workers: int = 1,
) -> Path:
    """Return a prepared shard directory for an embedded corpus, preparing it on first use.

    The directory name carries a hash of the exact file contents, the tokenizer and the shard
    format, so a different Python, tokenizer or ``max_bytes`` never reuses stale data.
    Concurrent callers (ranks, jobs) serialise on an ``flock``: the first prepares, the others
    wait and reuse its result.
    """
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    tok = get_tokenizer(tokenizer_spec)
    files = CORPORA[name](max_bytes)
    key = hashlib.sha256(
        json.dumps(
            {
                "corpus": name,
                "format": FORMAT_VERSION,
                "tokenizer": tok.sha256,
                "val_fraction": DEFAULT_VAL_FRACTION,
                "shard_tokens": DEFAULT_SHARD_TOKENS,
            },
            sort_keys=True,
        ).encode()
    )
    texts = [_read_text(f) for f in files]
    for text in texts:  # the documents alone decide the tokens; their file names do not
        data = text.encode()
        key.update(len(data).to_bytes(8, "little") + data)
    corpora = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpora = corpora / "corpora"
    out = corpora / f"{name}-{tok.name}-{key.hexdigest()[:12]}"
    if (out / MANIFEST).is_file():
        return out
    corpora.mkdir(parents=True, exist_ok=True)
    with open(corpus_lock(out), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also on a crash
        if (out / MANIFEST).is_file():
            logger.info("corpus %s was prepared by another process: reusing %s", name, out)
            return out
        logger.info(
            "preparing corpus %s (%d files, %.1f MB) with tokenizer %s into %s",
            name, len(files), sum(map(len, texts)) / 1e6, tok.name, out,
        )
        start = time.monotonic()
        manifest = write_shards(
            tokenize_texts((t for t in texts if t), tok, workers),
            out,
            tok.identity(),
            # A directory without a manifest is never complete: safe to replace under the lock.
            overwrite=True,
            metadata={"corpus": name, "python": sys.version, "num_files": len(files)},
        )
        logger.info(
            "prepared corpus %s: %d train tokens in %.1fs",
            name, manifest["splits"]["train"]["num_tokens"], time.monotonic() - start,
        )
    return out
