"""Corpus inputs: a file read twice would put the same document in both splits; files
skipped inside folders are reported."""

import subprocess
import sys
from pathlib import Path

import pytest

from cat_titan.data.corpus import collect_inputs, prepare_corpus
from cat_titan.data.shards import DataError


def test_a_file_read_twice_is_refused_before_any_work(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("a", "b", "c"):
        (folder / f"{name}.txt").write_text(f"document {name}\n" * 20)
    (tmp_path / "link.txt").symlink_to(folder / "c.txt")
    out = tmp_path / "out"
    # With val_fraction 0.5 (docs 1, 3, ... are validation), [docs/, docs/a.txt] reads a.txt as
    # document 0 (train) and again as document 3 (val): its text would be in both splits.
    cases = [([folder, folder / "a.txt"], "a.txt is read twice"),
             ([folder / "b.txt", folder / "b.txt"], "b.txt is read twice"),
             ([folder, tmp_path / "link.txt"], "link.txt is read twice .also as .*c.txt")]
    for inputs, message in cases:
        with pytest.raises(DataError, match=message):
            prepare_corpus(inputs, out, "byte", val_fraction=0.5)
        assert not out.exists()
    # distinct files are fine, in the order given
    assert [s.path.name for s in collect_inputs([folder / "b.txt", folder / "a.txt"])] == ["b.txt", "a.txt"]


def test_cli_reports_skipped_files_and_shows_its_defaults(tmp_path):
    prepare = [sys.executable, str(Path(__file__).resolve().parents[2] / "tools" / "prepare_data.py")]
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("kept\n")
    (folder / ".hidden.dat").write_text("hidden entries are skipped on purpose")
    for i in range(7):
        (folder / f"notes{i}.dat").write_text("unsupported\n")
    run = subprocess.run([*prepare, folder, "--out", tmp_path / "out"], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    skipped = ", ".join(str(folder / f"notes{i}.dat") for i in range(5))
    assert f"skipped 7 files with unsupported extensions: {skipped} and 2 more\n" in run.stderr, run.stderr
    assert ".hidden" not in run.stderr

    usage = subprocess.run([*prepare, "--help"], capture_output=True, text=True, timeout=120).stdout
    usage = " ".join(usage.split())  # argparse wraps lines at the terminal width
    for default in ("a .tiktoken file (default: byte)", "validation (default: 0.01)",
                    "shard file (default: 134217728)"):
        assert default in usage, (default, usage)
