"""--overwrite (overwrite=True) replaces prepared data directories only: anything else given
as the output, a training run directory above all, is refused and left exactly as it was."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cat_titan.data.corpus import prepare_corpus
from cat_titan.data.shards import DataError, ShardedTokens, write_shards
from cat_titan.data.tokenizer import get_tokenizer

REPO = Path(__file__).resolve().parents[2]
BYTE = get_tokenizer("byte")


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def _run_dir(d: Path) -> None:
    """What a training run leaves: config, metrics and a complete checkpoint."""
    ckpt = d / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (d / "config.yaml").write_text("training:\n  steps: 2\n")
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 5.5}\n')
    (ckpt / "meta.json").write_text('{"step": 2}')
    (ckpt / "__0_0.distcp").write_bytes(b"\0" * 64)
    (ckpt / "COMPLETE").write_text("")


def _foreign_manifest(d: Path) -> None:
    d.mkdir()
    (d / "manifest.json").write_text(json.dumps({"name": "some other tool's manifest"}))


def _data_plus_notes(d: Path) -> None:
    write_shards([[1, 2]], d, BYTE.identity())
    (d / "notes.txt").write_text("mine")


def _data_plus_subdir(d: Path) -> None:
    write_shards([[1, 2]], d, BYTE.identity())
    (d / "checkpoints").mkdir()


@pytest.fixture
def text(tmp_path):
    src = tmp_path / "txt"
    src.mkdir()
    (src / "a.txt").write_text("hello world, some text")
    return src


@pytest.mark.parametrize("make", [_run_dir, _foreign_manifest, _data_plus_notes, _data_plus_subdir])
def test_overwrite_refuses_directories_with_foreign_content(tmp_path, text, make):
    out = tmp_path / "out"
    make(out)
    before = _snapshot(out)
    refused = re.escape(str(out)) + r" is not a prepared data directory \(.*\).*delete it"
    with pytest.raises(DataError, match=refused):
        write_shards([[7, 8]], out, BYTE.identity(), overwrite=True)
    with pytest.raises(DataError, match=refused):
        prepare_corpus([text], out, "byte", overwrite=True)  # refused before tokenizing
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "txt"]  # no temp dirs left


@pytest.mark.parametrize("manifest", [True, False])
def test_overwrite_still_replaces_prepared_data(tmp_path, manifest):
    """A prepared directory, or one whose preparation stopped before its manifest (shard files
    only, what ensure_corpus replaces under its lock)."""
    out = tmp_path / "data"
    write_shards([[1, 2, 3]] * 5, out, BYTE.identity(), shard_tokens=4, val_fraction=0.2)
    if not manifest:
        (out / "manifest.json").unlink()
    write_shards([[7, 8]], out, BYTE.identity(), overwrite=True)
    assert ShardedTokens(out)[:].tolist() == [7, 8, 256]
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "train_00000.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_cli_overwrite_refuses_a_run_directory(tmp_path, text):
    run_dir = tmp_path / "run"
    _run_dir(run_dir)
    before = _snapshot(run_dir)
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "prepare_data.py"), str(text), "--out", str(run_dir),
         "--tokenizer", "byte", "--overwrite"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert f"prepare_data: error: {run_dir} is not a prepared data directory" in r.stderr, r.stderr
    assert _snapshot(run_dir) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "txt"]
