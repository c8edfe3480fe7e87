"""Value checks of cat_titan.config: every bad value is reported at once, with its key, the
value and what is allowed, before any work starts."""

from __future__ import annotations

import pytest

from cat_titan.config import load_config
from cat_titan.confutil import ConfigError


def test_negative_counts_and_intervals_are_refused_all_at_once() -> None:
    bad = {
        "checkpoint.interval": -1,      # saved every step (step % -1 == 0)
        "checkpoint.keep_every": -2,    # acted like 2
        "training.eval_interval": -1,
        "training.eval_batches": 0,     # validation loss nan (a mean over no batches)
        "data.num_workers": -1,         # crashed when the loader was built
        "data.corpus_max_bytes": -5,    # an empty corpus, then a traceback
    }
    with pytest.raises(ConfigError) as info:
        load_config(None, ["job.run_dir=x"] + [f"{k}={v}" for k, v in bad.items()])
    errors = info.value.errors
    assert len(errors) == len(bad), errors
    for key, value in bad.items():
        line = next((e for e in errors if e.startswith(f"{key}={value} ")), None)
        assert line is not None, (key, errors)
        assert "must be" in line, line  # says what is allowed


def test_zero_keeps_its_documented_meaning() -> None:
    """0 is 'off' / 'only at the end' / 'in the training process' for these keys."""
    cfg = load_config(None, ["job.run_dir=x", "checkpoint.interval=0", "checkpoint.keep_every=0",
                             "training.eval_interval=0", "data.num_workers=0", "training.eval_batches=1",
                             "data.corpus_max_bytes=1"])
    assert (cfg.checkpoint.interval, cfg.checkpoint.keep_every, cfg.training.eval_interval,
            cfg.data.num_workers, cfg.training.eval_batches, cfg.data.corpus_max_bytes) == (0, 0, 0, 0, 1, 1)
    assert load_config(None, ["job.run_dir=x"]).data.corpus_max_bytes is None  # None: the whole corpus
    with pytest.raises(ConfigError, match=r"data.corpus_max_bytes=0 must be"):
        load_config(None, ["job.run_dir=x", "data.corpus_max_bytes=0"])  # no files at all
