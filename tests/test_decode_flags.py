"""cat_titan/decode_flags.py: one set of rules for the decode-path options, spelled as flags
by the tools and as fields by SpeedConfig; importing it pulls in no torch."""

import argparse
import subprocess
import sys

import pytest

from cat_titan.decode_flags import FIELDS, add_decode_path_args, decode_path_argv, decode_path_error, lean_requested


@pytest.mark.parametrize("lean,fold,flag_msg,field_msg", [
    (None, False, None, None),
    (False, False, None, None),
    (None, True, None, None),  # the lean path is the default's, or taken explicitly
    (True, True, None, None),
    (False, True, "--fold-norms folds the norms of the lean path's blocks: drop --no-lean",
     "fold_norms folds the norms of the lean path's blocks: set lean=True or None"),
])
def test_rules_in_both_spellings(lean, fold, flag_msg, field_msg):
    assert decode_path_error(lean, fold) == flag_msg
    assert decode_path_error(lean, fold, FIELDS) == field_msg
    from cat_titan.infer.bench import SpeedConfig

    cfg = SpeedConfig(lean=lean, fold_norms=fold)
    if field_msg is None:
        cfg.validate()
    else:
        with pytest.raises(ValueError, match=field_msg.replace("(", r"\(").replace(")", r"\)")):
            cfg.validate()


def test_flags_parse_three_ways_and_the_module_needs_no_torch():
    p = argparse.ArgumentParser()
    add_decode_path_args(p)
    assert p.parse_args([]).lean is None and p.parse_args(["--no-lean"]).lean is False
    assert p.parse_args(["--lean", "--fold-norms"]).fold_norms
    for lean in (None, True, False):  # decode_path_argv spells a choice back as the flags that parse to it
        for fold in (False, True):
            a = p.parse_args(decode_path_argv(lean, fold))
            assert (a.lean, a.fold_norms) == (lean, fold)
    # --fold-norms alone asks for the lean path; no flag leaves it to compile_step's default
    assert [lean_requested(v, f) for v, f in ((None, False), (False, False), (None, True), (True, False))] == [
        False, False, True, True]
    code = "import sys, cat_titan.decode_flags; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"
