"""Shard files and manifest; corpus preparation (prepare_corpus, the CLI, ensure_corpus)."""

import gzip
import hashlib
import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cat_titan.data import corpus
from cat_titan.data.corpus import ensure_corpus, prepare_corpus, stdlib_files
from cat_titan.data.shards import (
    DataError,
    ShardedTokens,
    read_manifest,
    verify_shards,
    write_shards,
)
from cat_titan.data.tokenizer import get_tokenizer

from . import write_rank_file

REPO = Path(__file__).resolve().parents[2]
BYTE = get_tokenizer("byte")
TEXTS = [f"document {i}: " + "héllo 🚀 " * (i % 7) + "x" * (3 * i) for i in range(23)]


def _docs_from_splits(data_dir: Path, eot: int) -> list[list[int]]:
    """Documents in their original order, undoing the every-Nth validation assignment."""
    manifest = read_manifest(data_dir)
    split_docs = {}
    for split in manifest["splits"]:
        tokens = ShardedTokens(data_dir, split)[:].tolist()
        assert tokens[-1] == eot  # every document, the last one too, ends in eot
        docs, cur = [], []
        for t in tokens:
            if t == eot:
                docs.append(cur)
                cur = []
            else:
                cur.append(t)
        split_docs[split] = iter(docs)
    n = sum(s["num_documents"] for s in manifest["splits"].values())
    every = manifest["val_every"]
    return [next(split_docs["val" if every and i % every == 1 else "train"]) for i in range(n)]


def test_write_and_read_back_equals_direct_tokenization(tmp_path):
    docs = [BYTE.encode(t) for t in TEXTS]
    out = tmp_path / "data"
    manifest = write_shards(docs, out, BYTE.identity(), shard_tokens=50, val_fraction=0.25)
    assert manifest == read_manifest(out)
    assert manifest["dtype"] == "uint16" and manifest["val_every"] == 4
    assert manifest["tokenizer"] == BYTE.identity()
    # val holds documents 1, 5, 9, ...: whole documents, eot after each
    want = {"train": [], "val": []}
    for i, d in enumerate(docs):
        want["val" if i % 4 == 1 else "train"] += d + [BYTE.eot_id]
    for split in ("train", "val"):
        data = ShardedTokens(out, split)
        info = manifest["splits"][split]
        assert data.num_tokens == len(data) == info["num_tokens"] == len(want[split])
        assert data[:].tolist() == want[split]
        # windows across shard boundaries, and the empty/clipped edge cases of slices
        for start, stop in [(0, 1), (45, 55), (49, 151), (10, 10), (len(want[split]) - 3, 10**9)]:
            assert data[start:stop].tolist() == want[split][start:stop]
        in_split = [(i % 4 == 1) == (split == "val") for i in range(len(docs))]
        assert info["num_documents"] == sum(in_split)
        assert sum(s["num_documents"] for s in info["shards"]) == info["num_documents"]
        for k, shard in enumerate(info["shards"]):
            raw = (out / shard["file"]).read_bytes()
            assert shard["file"] == f"{split}_{k:05d}.bin"
            assert hashlib.sha256(raw).hexdigest() == shard["sha256"]
            # raw little-endian uint16, full shards except the last
            n = len(raw) // 2
            assert np.frombuffer(raw, "<u2").tolist() == want[split][50 * k : 50 * k + n]
            assert shard["num_tokens"] == (50 if k < len(info["shards"]) - 1 else len(raw) // 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no temp leftovers
    verify_shards(out)
    assert _docs_from_splits(out, BYTE.eot_id) == docs
    restored = pickle.loads(pickle.dumps(ShardedTokens(out)))
    assert restored[:].tolist() == want["train"]


@pytest.mark.parametrize("vocab,dtype,itemsize", [(65536, "uint16", 2), (65537, "uint32", 4)])
def test_dtype_follows_vocab_size(tmp_path, vocab, dtype, itemsize):
    ident = {"name": "wide", "vocab_size": vocab, "eot_id": vocab - 1, "sha256": "x"}
    docs = [[0, 65534, 1], [vocab - 2, 7]]
    manifest = write_shards(docs, tmp_path / "d", ident, val_fraction=0)
    assert manifest["dtype"] == dtype
    data = ShardedTokens(tmp_path / "d")
    assert data.dtype.itemsize == itemsize
    assert (tmp_path / "d" / "train_00000.bin").stat().st_size == 7 * itemsize
    assert data[:].tolist() == [0, 65534, 1, vocab - 1, vocab - 2, 7, vocab - 1]
    with pytest.raises(DataError, match=f"token id {vocab}, outside"):
        write_shards([[1, vocab]], tmp_path / "e", ident)


def test_validation_assignment(tmp_path):
    write_shards([[1]], tmp_path / "one", BYTE.identity(), val_fraction=0.01)
    assert list(read_manifest(tmp_path / "one")["splits"]) == ["train"]
    with pytest.raises(DataError, match="no 'val' split.*it has: train"):
        ShardedTokens(tmp_path / "one", "val")
    m = write_shards([[1], [2]], tmp_path / "two", BYTE.identity(), val_fraction=0.01)
    assert m["splits"]["val"]["num_documents"] == m["splits"]["train"]["num_documents"] == 1
    m = write_shards([[1], [2]], tmp_path / "none", BYTE.identity(), val_fraction=0)
    assert list(m["splits"]) == ["train"]
    with pytest.raises(DataError, match="val_fraction"):
        write_shards([[1]], tmp_path / "bad", BYTE.identity(), val_fraction=0.9)
    with pytest.raises(DataError, match="empty"):
        write_shards([], tmp_path / "empty", BYTE.identity())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["none", "one", "two"]


@pytest.fixture
def small(tmp_path):
    out = tmp_path / "small"
    write_shards([BYTE.encode(t) for t in TEXTS], out, BYTE.identity(), shard_tokens=64)
    return out


def test_damaged_directories_give_actionable_errors(small):
    shard = small / "train_00001.bin"
    raw = shard.read_bytes()
    shard.write_bytes(raw[:-2])
    with pytest.raises(DataError, match=r"train_00001.bin has 126 bytes.*64 uint16.* 128.*prepare_"):
        ShardedTokens(small)
    shard.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))  # same size, one bit flipped
    ShardedTokens(small)  # sizes are all that opening checks...
    with pytest.raises(DataError, match="train_00001.bin does not match its checksum"):
        verify_shards(small)  # ...the audit re-hashes
    shard.unlink()
    with pytest.raises(DataError, match="train_00001.bin listed in the manifest is missing.*prep"):
        ShardedTokens(small)
    manifest = json.loads((small / "manifest.json").read_text())
    manifest["dtype"] = "int8"
    (small / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="dtype 'int8'; allowed: uint16, uint32"):
        ShardedTokens(small)
    (small / "manifest.json").unlink()
    with pytest.raises(DataError, match="no manifest.json in .*small.*prepare_data"):
        ShardedTokens(small, "val")


def test_a_directory_without_manifest_is_told_apart_by_what_it_holds(small, tmp_path):
    """Missing, raw text, a file, unfinished shards, the corpus cache: each its own fix; only
    the cache's mentions ensure_corpus. The trainer passes data.path's message on as is."""
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("some text\n")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.dat").write_bytes(b"\0")
    cases = {
        tmp_path / "nope": r"data directory .*nope does not exist; check the path",
        raw: rf"raw holds raw input files \(1, e.g. a.txt\).*prepare_data.py {raw} --out {raw}-shards",
        raw / "a.txt": r"a.txt is a file, not a prepared data directory; tokenize it",
        tmp_path / "other": r"no manifest.json in .*other: it is not a prepared data directory; prepare",
    }
    for path, message in cases.items():
        with pytest.raises(DataError, match=message) as e:
            ShardedTokens(path)
        assert "ensure_corpus" not in str(e.value), path
    (small / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"small: its preparation did not finish; re-run.*--overwrite"):
        ShardedTokens(small)
    cache = ensure_corpus(cache_dir=tmp_path / "cache", max_bytes=30_000)
    (cache / "manifest.json").unlink()
    with pytest.raises(DataError, match=rf"delete {cache} .*ensure_corpus rebuilds it"):
        ShardedTokens(cache)

    run = subprocess.run(
        [sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "debug_cat.yaml"),
         f"job.run_dir={tmp_path / 'run'}", f"data.path={raw}", "training.steps=1"],
        capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert f"prepare_data.py {raw} --out {raw}-shards" in run.stderr, run.stderr
    assert "ensure_corpus" not in run.stderr and not (tmp_path / "run").exists()


def test_check_tokenizer(small, tmp_path):
    data = ShardedTokens(small)
    data.check_tokenizer(BYTE.identity())
    data.check_tokenizer(257)
    data.check_tokenizer(512)  # a padded model vocab holds every data id
    with pytest.raises(DataError, match=r"vocab_size is 256.*set model.vocab_size=257 \(or larger\)"):
        data.check_tokenizer(256)
    ident = {"name": "gpt2", "spec": "gpt2", "vocab_size": 50257, "eot_id": 50256, "sha256": "g"}
    write_shards([[5, 50000]], tmp_path / "g", ident)
    with pytest.raises(DataError, match="vocab_size 50257 but the model's vocab_size is 256"):
        ShardedTokens(tmp_path / "g").check_tokenizer(256)
    with pytest.raises(DataError, match=r"vocab_size: data 50257 vs expected 257; eot_id: data"):
        ShardedTokens(tmp_path / "g").check_tokenizer(BYTE.identity())


def test_atomic_write_and_overwrite(small, tmp_path):
    def failing_docs():
        yield [1, 2, 3]
        raise RuntimeError("crash while tokenizing")

    with pytest.raises(RuntimeError):
        write_shards(failing_docs(), tmp_path / "new", BYTE.identity())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]  # no out, no temp dir
    before = read_manifest(small)
    with pytest.raises(DataError, match="not empty; pass --overwrite"):
        write_shards([[1]], small, BYTE.identity())
    with pytest.raises(RuntimeError):
        write_shards(failing_docs(), small, BYTE.identity(), overwrite=True)
    assert read_manifest(small) == before  # a failed overwrite keeps the old data intact
    write_shards([[7, 8]], small, BYTE.identity(), overwrite=True)
    assert ShardedTokens(small)[:].tolist() == [7, 8, 256]
    assert sorted(p.name for p in small.iterdir()) == ["manifest.json", "train_00000.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small"]


# --- prepare_corpus / tools/prepare_data.py --------------------------------------------------


@pytest.fixture
def inputs(tmp_path):
    """Every input kind; returns (paths to pass, the documents they hold in order)."""
    src = tmp_path / "src"
    (src / "folder" / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("plain text file ✓\n")
    (src / "folder" / "b.md").write_text("# markdown\n")
    (src / "folder" / "sub" / "c.py").write_text("print('the thing')\n")
    (src / "folder" / "skip.bin").write_bytes(b"\x00\x01")  # unsupported: skipped in folders
    (src / "folder" / ".hidden.txt").write_text("hidden")
    (src / "folder" / "empty.txt").write_text("")  # no text: no document
    rows = [{"text": f"json row {i} 日本", "id": i} for i in range(5)]
    (src / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n\n")
    with gzip.open(src / "e.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[3:]))
    table = pa.table({"text": ["pq one", None, "pq three"], "n": [1, 2, 3]})
    pq.write_table(table, src / "f.parquet")
    paths = [src / "a.txt", src / "folder", src / "d.jsonl", src / "e.jsonl.gz", src / "f.parquet"]
    docs = (
        ["plain text file ✓\n", "# markdown\n", "print('the thing')\n"]
        + [r["text"] for r in rows]
        + ["pq one", "pq three"]
    )
    return paths, docs


def test_prepare_corpus_all_input_kinds_any_worker_count(tmp_path, inputs, monkeypatch):
    paths, docs = inputs
    # one document a chunk: more chunks than the 2 * workers in flight, all workers busy
    monkeypatch.setattr(corpus, "_CHUNK_DOCS", 1)
    spec = str(write_rank_file(tmp_path / "tiny.tiktoken"))
    tok = get_tokenizer(spec)
    outs = {}
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        m = prepare_corpus(paths, out, spec, workers=workers, shard_tokens=40, val_fraction=0.25)
        assert m["tokenizer"] == tok.identity()
        assert _docs_from_splits(out, tok.eot_id) == [tok.encode(d) for d in docs]
        outs[workers] = {p.name: p.read_bytes() for p in out.iterdir()}
    assert outs[1] == outs[3]  # byte-identical, manifest included
    assert len(outs[1]) > 3  # several shards were written


def test_prepare_corpus_bad_inputs_write_nothing(tmp_path, inputs):
    paths, _ = inputs
    out = tmp_path / "out"
    (paths[2].parent / "skip.bin").write_bytes(b"\x00")
    with pytest.raises(DataError, match="input .*nope.txt does not exist"):
        prepare_corpus([paths[0], tmp_path / "nope.txt"], out, "byte")
    with pytest.raises(DataError, match="unsupported input file .*skip.bin"):
        prepare_corpus([paths[0], paths[2].parent / "skip.bin"], out, "byte")
    missing = r"d.jsonl:1: no text field 'body' \(found: 'text', 'id'\); pass --text-field"
    with pytest.raises(DataError, match=missing):
        prepare_corpus(paths, out, "byte", text_field="body")
    with pytest.raises(DataError, match="f.parquet: no text column 'content'"):
        prepare_corpus([paths[4]], out, "byte", text_field="content")
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(DataError, match="empty"):
        prepare_corpus([tmp_path / "blank.txt"], out, "byte")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), *map(str, args)],
        cwd=cwd, capture_output=True, text=True, timeout=120,
    )


def test_cli(tmp_path, inputs):
    paths, docs = inputs
    out = tmp_path / "cli_out"
    r = _cli(*paths, "--out", out, "--workers", 2, "--val-fraction", 0.2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "prepare_data: wrote" in r.stderr
    assert _docs_from_splits(out, BYTE.eot_id) == [BYTE.encode(d) for d in docs]
    before = read_manifest(out)
    r = _cli(paths[0], "--out", out, cwd=tmp_path)
    assert r.returncode == 2 and "not empty; pass --overwrite" in r.stderr
    r = _cli(tmp_path / "missing", "--out", tmp_path / "o2", cwd=tmp_path)
    assert r.returncode == 2 and "missing does not exist" in r.stderr
    assert not (tmp_path / "o2").exists() and read_manifest(out) == before
    r = _cli(paths[0], "--out", out, "--overwrite", "--tokenizer", "gtp2", cwd=tmp_path)
    assert r.returncode == 2 and "unknown tokenizer spec 'gtp2'" in r.stderr


# --- ensure_corpus ---------------------------------------------------------------------------


def test_ensure_corpus_builds_once_and_reuses(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cat_titan.data.corpus")
    path = ensure_corpus(cache_dir=tmp_path, max_bytes=60_000)
    assert path.parent == tmp_path / "corpora" and path.name.startswith("stdlib-byte-")
    assert sum("preparing corpus" in r.message for r in caplog.records) == 1
    files = stdlib_files(60_000)
    assert len(files) >= 2 and Path(files[0]).name == "__future__.py"
    want = [list(f.read_bytes()) for f in files if f.stat().st_size]
    assert _docs_from_splits(path, BYTE.eot_id) == want
    stamp = (path / "manifest.json").stat().st_mtime_ns
    caplog.clear()
    assert ensure_corpus(cache_dir=tmp_path, max_bytes=60_000) == path
    assert not caplog.records and (path / "manifest.json").stat().st_mtime_ns == stamp
    other = ensure_corpus(cache_dir=tmp_path, max_bytes=30_000)
    assert other != path and ShardedTokens(other).num_tokens < ShardedTokens(path).num_tokens
    with pytest.raises(DataError, match="unknown corpus 'wiki'; available: stdlib"):
        ensure_corpus("wiki", cache_dir=tmp_path)


def test_ensure_corpus_concurrent_callers_prepare_once(tmp_path):
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stderr);"
        "from cat_titan.data.corpus import ensure_corpus;"
        f"print(ensure_corpus(cache_dir={str(tmp_path)!r}, max_bytes=2_000_000))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 for _, _, rc in results), results
    assert results[0][0] == results[1][0]
    assert sum(err.count("preparing corpus") for _, err, _ in results) == 1, results
    corpora = tmp_path / "corpora"
    assert sorted(p.name for p in corpora.iterdir() if not p.name.endswith(".lock")) == [
        Path(results[0][0].strip()).name
    ]
    verify_shards(results[0][0].strip())
