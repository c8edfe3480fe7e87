import base64
import json
import pickle
import re
from pathlib import Path

import pytest
import tiktoken

from cat_titan.data.tokenizer import (
    ENDOFTEXT,
    TokenizerError,
    TokenizerUnavailableError,
    get_tokenizer,
)

from . import MERGES, write_rank_file

TEXT = "héllo wörld 🚀 日本語\n\tcode: x = 1\x00 and a literal " + ENDOFTEXT


def test_byte_round_trip_and_conventions():
    tok = get_tokenizer("byte")
    assert isinstance(tok.encoding, tiktoken.Encoding)
    assert (tok.vocab_size, tok.eot_id, tok.name) == (257, 256, "byte")
    ids = tok.encode(TEXT)
    # byte level: ids are the UTF-8 bytes; the special-token string is plain text, not eot
    assert ids == list(TEXT.encode("utf-8"))
    assert tok.eot_id not in ids
    assert tok.decode(ids) == TEXT
    assert tok.encode_batch([TEXT, "", "ab"]) == [ids, [], [97, 98]]
    # a window may cut a character: decoding replaces instead of raising
    rocket = list("🚀".encode())
    assert tok.decode(rocket[:2] + [97]) == "\ufffda"


def test_identity_is_json_safe_stable_and_pickles_by_spec(tmp_path):
    tok = get_tokenizer("byte")
    ident = tok.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert set(ident) == {"spec", "name", "vocab_size", "eot_id", "sha256"}
    assert len(pickle.dumps(tok)) < 200  # the spec travels, not the rank table
    assert pickle.loads(pickle.dumps(tok)).identity() == ident
    other = get_tokenizer(str(write_rank_file(tmp_path / "tiny.tiktoken")))
    assert other.identity()["sha256"] != ident["sha256"]


def test_tiktoken_file_load_and_round_trip(tmp_path, monkeypatch):
    path = write_rank_file(tmp_path / "tiny.tiktoken")
    tok = get_tokenizer(str(path))
    n = 256 + len(MERGES)
    assert (tok.eot_id, tok.vocab_size, tok.name) == (n, n + 1, "tiny")
    # "the" merges th -> the; " thing" merges th, in, ing (lowest rank first)
    assert tok.encode("the thing") == [258, 32, 256, 261]
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eot_id not in tok.encode(TEXT)
    # "file:" prefix, any suffix, relative to the working directory: the same tokenizer
    renamed = write_rank_file(tmp_path / "tiny.ranks")
    monkeypatch.chdir(tmp_path)
    same = get_tokenizer("file:tiny.ranks")
    assert same.spec == f"file:{renamed}"
    assert same.identity()["sha256"] == tok.identity()["sha256"]
    assert pickle.loads(pickle.dumps(same)).encode("the thing") == [258, 32, 256, 261]
    # a different rank table is a different identity
    changed = get_tokenizer(str(write_rank_file(tmp_path / "other.tiktoken", MERGES[:-1])))
    assert changed.identity()["sha256"] != tok.identity()["sha256"]


def test_relative_file_specs_resolve_per_working_directory(tmp_path, monkeypatch):
    for sub, merges in (("a", MERGES), ("b", MERGES[:2])):
        (tmp_path / sub).mkdir()
        write_rank_file(tmp_path / sub / "tok.tiktoken", merges)
    monkeypatch.chdir(tmp_path / "a")
    a = get_tokenizer("tok.tiktoken")
    monkeypatch.chdir(tmp_path / "b")
    b = get_tokenizer("tok.tiktoken")
    assert (a.vocab_size, b.vocab_size) == (263, 259)
    assert a.spec != b.spec


def test_bad_specs_name_the_value_and_the_forms(tmp_path):
    with pytest.raises(TokenizerError) as e:
        get_tokenizer("gtp2")
    msg = str(e.value)
    for word in ("'gtp2'", "'byte'", ".tiktoken", "file:", "gpt2", "cl100k_base"):
        assert word in msg
    with pytest.raises(TokenizerError, match="missing.tiktoken.*does not exist"):
        get_tokenizer(str(tmp_path / "missing.tiktoken"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not base64 at all\n")
    with pytest.raises(TokenizerError, match="bad.tiktoken"):
        get_tokenizer(str(bad))


def unavailable_p50k(tmp_path, monkeypatch) -> TokenizerUnavailableError:
    """A real download failure on any machine: an empty cache and an unreachable proxy."""
    if "p50k_base" in tiktoken.registry.ENCODINGS:
        pytest.skip("p50k_base is already loaded in this process")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    for var in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TokenizerUnavailableError) as e:
        get_tokenizer("p50k_base")
    return e.value


def test_unavailable_encoding_explains_the_fix(tmp_path, monkeypatch):
    err = unavailable_p50k(tmp_path, monkeypatch)
    msg = str(err)
    for word in ("'p50k_base'", "TIKTOKEN_CACHE_DIR", "'byte'", ".tiktoken"):
        assert word in msg
    assert isinstance(err, ValueError)


def test_gpt2_if_cached():
    try:
        tok = get_tokenizer("gpt2")
    except TokenizerUnavailableError as e:
        pytest.skip(f"gpt2 rank files are not cached here and cannot be downloaded: {e}")
    assert (tok.vocab_size, tok.eot_id) == (50257, 50256)
    assert tok.encode("hello world") == [31373, 995]
    assert tok.encode(ENDOFTEXT) != [tok.eot_id]
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_rank_files_that_tiktoken_would_panic_on_are_refused_on_load(tmp_path):
    # Without every single byte, encoding text that holds a missing byte panics in tiktoken's
    # Rust core (a BaseException, mid-preparation); shared ranks panic when building it.
    lines = [f"{base64.b64encode(bytes([i])).decode()} {i}\n" for i in range(128)]  # ASCII only
    ascii_only = tmp_path / "ascii.tiktoken"
    ascii_only.write_text("".join(lines))
    with pytest.raises(TokenizerError, match=r"ascii.tiktoken lacks 128 of the 256 single-byte.*byte 128"):
        get_tokenizer(str(ascii_only))
    shared = write_rank_file(tmp_path / "shared.tiktoken")
    shared.write_text(shared.read_text().replace(" 261\n", " 260\n"))  # b"ing" takes b"in"'s rank
    with pytest.raises(TokenizerError, match=r"rank 260 to both b'in' and b'ing'"):
        get_tokenizer(str(shared))


def test_unavailable_encoding_names_the_cache_file_tiktoken_reads(tmp_path, monkeypatch):
    # tiktoken caches under the SHA-1 of the URL: the message names that exact path. tiktoken
    # deletes a cached file whose hash is wrong, which shows that it read the named path.
    err = unavailable_p50k(tmp_path, monkeypatch)
    named = re.search(r"tiktoken reads it from (\S+)\.", str(err))
    assert named, str(err)
    cached = Path(named.group(1))
    assert cached.parent == tmp_path
    cached.write_text("not the real rank file")
    with pytest.raises(TokenizerUnavailableError):
        get_tokenizer("p50k_base")
    assert not cached.exists()
    assert "tiktoken.get_encoding('p50k_base')" in str(err)  # how to fill a cache elsewhere
