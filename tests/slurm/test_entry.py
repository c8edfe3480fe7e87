"""slurm/entry.py without a cluster: the node exit status kept from the workers' statuses,
and the config check that train.sbatch runs before starting any node."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("slurm_entry", ROOT / "slurm" / "entry.py")
entry = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(entry)


@pytest.mark.parametrize("codes, status", [
    ([], 0),             # every worker succeeded
    ([75, 75], 75),      # all saved and stopped
    ([75, -15], 75),     # one stopped after the complete checkpoint, torchrun's clean-up hit the other
    ([2, 2], 2),         # bad config on every rank
    ([1, -15], 1),       # a crash, then clean-up
    ([-9, 1], 1),        # a rank killed, its peer's collective failed
    ([-9], 1),           # killed by a signal is a crash, not a status to pass on
    ([2, 1], 1),         # mixed failures
])
def test_node_status(codes, status):
    assert entry.node_status(codes) == status


def test_check_prints_run_dir_and_rejects_bad_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = str(ROOT / "configs" / "debug_cat.yaml")
    assert entry.main(["check", "--config", config, f"job.run_dir={tmp_path / 'run'}", "training.global_batch=8",
                       "training.micro_batch=4"]) == 0
    assert capsys.readouterr().out.strip() == str((tmp_path / "run").resolve())
    assert not (tmp_path / "run").exists()  # checking writes nothing

    # micro_batch 8 x 2 ranks does not divide global_batch 8: a problem only WORLD_SIZE reveals
    assert entry.main(["check", "--config", config, "training.global_batch=8", "training.micro_batch=8"]) == 2
    assert "global_batch" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert entry.main(["check", "--config", config, "training.global_batch=8", "training.micro_batch=8"]) == 0
    capsys.readouterr()
    assert entry.main(["check", "--config", config, "training.steps=many", "no_such.key=1"]) == 2
    err = capsys.readouterr().err
    assert "training.steps" in err and "no_such" in err, err  # every problem at once
    assert entry.main(["bogus"]) == 2
