"""Token shard files and their manifest.

A prepared data directory holds::

    manifest.json          written last: a directory without it is not (yet) data
    train_00000.bin ...    raw little-endian uint16 (vocab <= 65536) or uint32 token ids
    val_00000.bin ...

Every document is followed by the tokenizer's end-of-text id, and a split is read as the
concatenation of its shards, so documents (and training windows) may span shard boundaries.
The manifest (``FORMAT_VERSION`` 1)::

    {"format": "cat_titan.shards", "version": 1,
     "tokenizer": {spec, name, vocab_size, eot_id, sha256},   # Tokenizer.identity()
     "vocab_size": 257, "eot_id": 256, "dtype": "uint16",
     "val_every": 100,          # document i is validation iff i % val_every == 1 (0: none)
     "splits": {"train": {"num_tokens": T, "num_documents": D,
                          "shards": [{"file": "train_00000.bin", "num_tokens": t,
                                      "num_documents": d, "sha256": "..."}, ...]},
                "val": {...}},   # a split with no documents is absent
     "metadata": {...}}          # free-form: what the data was made from

A shard's ``num_documents`` counts the documents that end in it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

FORMAT = "cat_titan.shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16: few files, each cheap to hash and map
DEFAULT_VAL_FRACTION = 0.01


class DataError(ValueError):
    """Bad or inconsistent data; the message names the file or value and the fix."""


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def val_every(val_fraction: float) -> int:
    """Stride of the validation documents: doc i is validation iff ``i % stride == 1``.

    Offset 1 (not 0) keeps a lone document in train and puts one of any two in validation.
    """
    if not 0.0 <= val_fraction <= 0.5:
        raise DataError(f"val_fraction must lie in [0, 0.5], got {val_fraction}")
    return 0 if val_fraction == 0 else max(2, round(1 / val_fraction))


class _SplitWriter:
    """Streams one split's tokens into fixed-size shard files, hashing as it writes."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split = out_dir, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def add(self, tokens: np.ndarray) -> None:
        """Append one document (already ending in eot), splitting it at shard boundaries."""
        start = 0
        while start < tokens.size:
            if self._file is None:
                self._open()
            end = min(tokens.size, start + self.shard_tokens - self._tokens)
            data = tokens[start:end].tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._tokens += end - start
            if end == tokens.size:
                self._docs += 1  # the document ends in this shard
            start = end
            if self._tokens == self.shard_tokens:
                self.close()

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._name, self._file = name, open(self.out_dir / name, "wb")
        self._hash, self._tokens, self._docs = hashlib.sha256(), 0, 0

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards.append(
            {
                "file": self._name,
                "num_tokens": self._tokens,
                "num_documents": self._docs,
                "sha256": self._hash.hexdigest(),
            }
        )

    def summary(self) -> dict:
        return {
            "num_tokens": sum(s["num_tokens"] for s in self.shards),
            "num_documents": sum(s["num_documents"] for s in self.shards),
            "shards": self.shards,
        }


def _is_nonempty_dir(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


_SHARD_FILE = re.compile(r"(?:train|val)_\d{5}\.bin")


def _not_prepared_data(path: Path) -> str | None:
    """Why ``path`` (a non-empty directory) is not one that ``write_shards`` wrote, or None.

    Overwriting deletes the old directory, so only a prepared data directory qualifies: shard
    files and (unless its preparation stopped before the end) a cat_titan shard manifest,
    nothing else. A run directory or a directory of inputs is left to the user to delete.
    """
    if (path / MANIFEST).exists():
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            return f"its {MANIFEST} is unreadable"
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            return f"its {MANIFEST} is not a cat_titan shard manifest"
    foreign = sorted(
        p.name
        for p in path.iterdir()
        if p.name != MANIFEST
        and not (_SHARD_FILE.fullmatch(p.name) and p.is_file() and not p.is_symlink())
    )
    if foreign:
        return f"it also holds {first_few(foreign)}"
    return None


def first_few(items: Sequence, k: int = 5) -> str:
    """The first k items for a message, and how many more there are."""
    more = f" and {len(items) - k} more" if len(items) > k else ""
    return ", ".join(map(str, items[:k])) + more


def check_out_dir(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output that exists and is not an empty directory, unless overwriting a
    prepared data directory (see ``_not_prepared_data``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"output {out} exists and is not a directory; choose another output")
    if _is_nonempty_dir(out) and not overwrite:
        raise DataError(
            f"output directory {out} exists and is not empty; pass --overwrite (overwrite=True) "
            "to replace it, or choose another output"
        )
    if _is_nonempty_dir(out) and (why := _not_prepared_data(out)):
        raise DataError(
            f"{out} is not a prepared data directory ({why}), and --overwrite (overwrite=True) "
            "replaces only those; choose another output, or delete it yourself if nothing in it "
            "is needed"
        )
    return out


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move a finished temp directory to ``out`` with renames, so ``out`` is never partial."""
    check_out_dir(out, overwrite)
    if _is_nonempty_dir(out):
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old)
        return
    if out.is_dir():
        out.rmdir()
    os.rename(tmp, out)


def write_shards(
    docs: Iterable[Sequence[int] | np.ndarray],
    out_dir: str | os.PathLike,
    tokenizer_identity: Mapping,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    dtype: str | None = None,
    overwrite: bool = False,
    metadata: Mapping | None = None,
) -> dict:
    """Write documents of token ids as shards + manifest into ``out_dir``; return the manifest.

    Everything is written into a sibling temp directory that is renamed into place only when
    complete, so a crash leaves either the old state or the new one (plus a stray ``.tmp``).
    Validation gets whole documents: i % ``val_every(val_fraction)`` == 1.
    """
    vocab_size, eot_id = int(tokenizer_identity["vocab_size"]), int(tokenizer_identity["eot_id"])
    dtype = dtype or dtype_for_vocab(vocab_size)
    if dtype not in DTYPES:
        raise DataError(f"unknown shard dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if vocab_size > np.iinfo(DTYPES[dtype]).max + 1:
        raise DataError(f"dtype {dtype} cannot hold vocab_size {vocab_size}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
    stride = val_every(val_fraction)
    out = check_out_dir(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    np_dtype = DTYPES[dtype]
    writers = {s: _SplitWriter(tmp, s, np_dtype, shard_tokens) for s in SPLITS}
    eot = np.array([eot_id], dtype=np.int64)
    try:
        n_docs = 0
        for i, doc in enumerate(docs):
            ids = np.asarray(doc, dtype=np.int64)
            # Checked before the narrowing cast, which would wrap silently.
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
                raise DataError(
                    f"document {i} holds token id {bad}, outside [0, {vocab_size}) of "
                    f"tokenizer {tokenizer_identity.get('name')!r}"
                )
            split = "val" if stride and i % stride == 1 else "train"
            writers[split].add(np.concatenate([ids, eot]).astype(np_dtype))
            n_docs += 1
        if n_docs == 0:
            raise DataError(f"no documents to write to {out}: the corpus is empty")
        for w in writers.values():
            w.close()
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "tokenizer": dict(tokenizer_identity),
            "vocab_size": vocab_size,
            "eot_id": eot_id,
            "dtype": dtype,
            "val_every": stride,
            "splits": {s: w.summary() for s, w in writers.items() if w.shards},
            "metadata": dict(metadata or {}),
        }
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, out, overwrite)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def corpus_lock(data_dir: Path) -> Path:
    """The lock ``ensure_corpus`` takes to prepare ``data_dir``: it marks the corpus cache."""
    return data_dir.parent / f".{data_dir.name}.lock"


def _fix(data_dir: Path) -> str:
    # the cache is rebuilt by the next run; a user's directory only by the user
    if corpus_lock(data_dir).is_file():
        return (
            f"delete {data_dir} (the embedded-corpus cache): ensure_corpus rebuilds it on the "
            "next run"
        )
    return f"re-run tools/prepare_data.py with --out {data_dir} --overwrite"


def _no_manifest(data_dir: Path) -> str:
    """Why ``data_dir`` has no manifest, and the fix: what the directory holds decides both."""
    if not data_dir.exists():
        return (
            f"data directory {data_dir} does not exist; check the path, or prepare data there "
            f"with `python tools/prepare_data.py INPUTS --out {data_dir}`"
        )
    if not data_dir.is_dir():
        return (
            f"{data_dir} is a file, not a prepared data directory; tokenize it with "
            f"`python tools/prepare_data.py {data_dir} --out DIR` and set data.path=DIR"
        )
    shards = any(_SHARD_FILE.fullmatch(p.name) for p in data_dir.iterdir())
    if shards or corpus_lock(data_dir).is_file():
        return f"no {MANIFEST} in {data_dir}: its preparation did not finish; {_fix(data_dir)}"
    from .corpus import collect_inputs  # here: corpus imports this module

    try:
        inputs = collect_inputs([data_dir])
    except DataError:  # no supported input files in it
        inputs = []
    if inputs:
        out = f"{data_dir.resolve()}-shards"  # resolved: "." has no name to extend
        return (
            f"{data_dir} holds raw input files ({len(inputs)}, e.g. {inputs[0].path.name}), not "
            f"prepared token shards; tokenize them with `python tools/prepare_data.py {data_dir} "
            f"--out {out}` and set data.path={out}"
        )
    return (
        f"no {MANIFEST} in {data_dir}: it is not a prepared data directory; prepare one with "
        "`python tools/prepare_data.py INPUTS --out DIR` and set data.path=DIR"
    )


def read_manifest(data_dir: str | os.PathLike) -> dict:
    """Load and sanity-check ``data_dir/manifest.json``."""
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST
    if not path.is_file():
        raise DataError(_no_manifest(data_dir))
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); {_fix(data_dir)}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} is not a cat_titan shard manifest (its format is not {FORMAT!r})")
    if manifest.get("version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has shard format version {manifest.get('version')!r}; this code reads "
            f"version {FORMAT_VERSION}; {_fix(data_dir)}"
        )
    missing = [k for k in ("tokenizer", "vocab_size", "eot_id", "splits") if k not in manifest]
    if missing:
        raise DataError(f"{path} lacks the fields {', '.join(missing)}; {_fix(data_dir)}")
    if manifest.get("dtype") not in DTYPES:
        raise DataError(
            f"{path} names dtype {manifest.get('dtype')!r}; allowed: {', '.join(DTYPES)}; "
            f"{_fix(data_dir)}"
        )
    return manifest


def verify_shards(data_dir: str | os.PathLike) -> None:
    """Re-hash every shard against the manifest (reads all data: for audits, not startup)."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            h = hashlib.sha256()
            with open(data_dir / shard["file"], "rb") as f:
                while chunk := f.read(1 << 24):
                    h.update(chunk)
            if h.hexdigest() != shard["sha256"]:
                raise DataError(
                    f"shard {data_dir / shard['file']} does not match its checksum in the "
                    f"manifest: it was modified or corrupted; {_fix(data_dir)}"
                )


class ShardedTokens:
    """One split of a prepared directory as a read-only token array over memory-mapped shards.

    Only sizes are checked on open (cheap at any scale); :func:`verify_shards` re-hashes.
    Pickles as (data_dir, split) and re-maps the files in the receiving process.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str = "train"):
        self.data_dir = Path(data_dir)
        self.split = split
        self.manifest = read_manifest(self.data_dir)
        splits = self.manifest["splits"]
        if split not in splits:
            raise DataError(
                f"{self.data_dir} has no {split!r} split (it has: {', '.join(splits)}); a 'val' "
                "split needs at least two documents and --val-fraction > 0"
            )
        self.dtype = DTYPES[self.manifest["dtype"]]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eot_id: int = self.manifest["eot_id"]
        self._shards: list[np.memmap] = []
        for shard in splits[split]["shards"]:
            path = self.data_dir / shard["file"]
            if not path.is_file():
                raise DataError(
                    f"shard {path} listed in the manifest is missing; {_fix(self.data_dir)}"
                )
            want = shard["num_tokens"] * self.dtype.itemsize
            if path.stat().st_size != want:
                raise DataError(
                    f"shard {path} has {path.stat().st_size} bytes but the manifest says "
                    f"{shard['num_tokens']} {self.manifest['dtype']} tokens = {want} bytes: the "
                    f"file is truncated or was modified; {_fix(self.data_dir)}"
                )
            self._shards.append(np.memmap(path, dtype=self.dtype, mode="r"))
        # starts[k] = global index of shard k's first token; starts[-1] = num_tokens
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])
        self.num_tokens = int(self._starts[-1])

    @property
    def fingerprint(self) -> str:
        """Short hash of this split's contents (its shard checksums), for resume checks."""
        shas = "".join(s["sha256"] for s in self.manifest["splits"][self.split]["shards"])
        return hashlib.sha256(shas.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return self.num_tokens

    def __getitem__(self, index: slice) -> np.ndarray:
        """Tokens ``[start, stop)`` of the concatenated split as a new array (native dtype)."""
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError(f"ShardedTokens supports contiguous slices only, got {index!r}")
        start, stop, _ = index.indices(self.num_tokens)
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop, side="left")) - 1
        parts = []
        for k in range(first, last + 1):
            base = int(self._starts[k])
            lo, hi = max(start, base) - base, min(stop, int(self._starts[k + 1])) - base
            parts.append(self._shards[k][lo:hi])
        return np.concatenate(parts)

    def check_tokenizer(self, expected: Mapping | int) -> None:
        """Raise unless the data fits the model's tokenizer identity or vocab size.

        With an int (the model's vocab_size), data ids must fit: a model vocab padded above the
        tokenizer's (e.g. 50304 for 50257) is fine, a smaller one is not.
        """
        where = f"data in {self.data_dir} (tokenizer {self.manifest['tokenizer'].get('name')!r})"
        if isinstance(expected, int):
            if self.vocab_size > expected:
                raise DataError(
                    f"{where} has vocab_size {self.vocab_size} but the model's vocab_size is "
                    f"{expected}: token ids would overflow the embedding. Prepare the data with "
                    f"the model's tokenizer, or set model.vocab_size={self.vocab_size} (or larger)"
                )
            return
        ours = self.manifest["tokenizer"]
        diffs = [
            f"{k}: data {ours.get(k)!r} vs expected {expected.get(k)!r}"
            for k in ("vocab_size", "eot_id", "sha256")
            if ours.get(k) != expected.get(k)
        ]
        if diffs:
            raise DataError(
                f"{where} was tokenized with a different tokenizer than expected "
                f"({expected.get('spec')!r}): {'; '.join(diffs)}. Re-prepare the data with the "
                "expected tokenizer or configure the matching one"
            )

    def __reduce__(self):
        return ShardedTokens, (self.data_dir, self.split)
