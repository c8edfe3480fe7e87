"""Corpus inputs: a file read twice would put the same document in both splits."""

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
