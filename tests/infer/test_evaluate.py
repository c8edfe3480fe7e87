"""The chunk-start split of the validation loss: the two parts recombine to the trainer's loss
(the model's labels path), and a hand count of which targets open a chunk. float32, 1e-5.
The chunk sizes evaluated by default are exactly those the training curriculum drew."""

from pathlib import Path

import pytest
import torch

from cat_titan import confutil
from cat_titan.config import CurriculumConfig
from cat_titan.infer.evaluate import EvalConfig, chunk_start_losses, eval_chunk_sizes, markdown_table, validation_loss
from cat_titan.infer.pretrained import Pretrained
from cat_titan.train.curriculum import build_curriculum

from .util import debug_model


@pytest.mark.parametrize("name,chunk", [("debug-cat", None), ("debug-cat-adaptive", 2), ("debug-cat-adaptive", 4)])
def test_chunk_start_split_recombines_to_the_validation_loss(name, chunk):
    model = debug_model(name)
    C = chunk or model.args.chunk_size
    g = torch.Generator().manual_seed(3)
    L = 4 * C + 3  # a partial last chunk too
    batches = [(torch.randint(0, 257, (2, L), generator=g), torch.randint(0, 257, (2, L), generator=g))
               for _ in range(2)]
    first, rest = chunk_start_losses(model, batches, C)
    # targets at positions 1..L (the label of input t is position t+1); C, 2C, .. open a chunk
    n_first = sum(1 for p in range(1, L + 1) if p % C == 0)
    mean = (n_first * first + (L - n_first) * rest) / L
    assert abs(mean - validation_loss(model, batches, chunk)) <= 1e-5
    assert first != rest


def test_markdown_table_shows_the_split_for_cat_rows_only():
    rows = [dict(model="d", kind="dense", chunk_size=None, val_loss=1.0, val_ppl=2.7),
            dict(model="c", kind="cat", chunk_size=8, val_loss=2.0, val_ppl=7.4, val_loss_chunk_start=3.25,
                 val_loss_in_chunk=1.875)]
    md = markdown_table(rows).splitlines()
    assert "chunk starts / rest" in md[0]
    assert "| d | dense | - | 1.0000 | 2.700 | - |" in md[2]
    assert "| c | cat | 8 | 2.0000 | 7.400 | 3.250 / 1.875 |" in md[3]


@pytest.mark.parametrize("curriculum,want", [
    ({}, [1, 2, 4, 8]),  # unknown curriculum: every size the model accepts
    ({"kind": "uniform", "min_chunk_size": 2}, [2, 4, 8]),
    ({"kind": "round_robin", "min_chunk_size": 2, "max_chunk_size": 4}, [2, 4]),
    ({"kind": "fixed"}, [8]),  # only the largest size is ever trained
    ({"kind": "fixed", "max_chunk_size": 4}, [4]),
    ({"kind": "weights", "weights": [0.0, 1.0, 0.0, 2.0]}, [2, 8]),  # weight 0: never drawn
], ids=["unknown", "uniform", "round_robin", "fixed", "fixed-max4", "weights"])
def test_evaluated_chunk_sizes_are_the_trained_ones(curriculum, want):
    model = debug_model("debug-cat-adaptive")  # chunk_size 8
    config = {"curriculum": curriculum} if curriculum else {}
    pre = Pretrained(model=model, path=Path("m.safetensors"), tokenizer_spec="byte", train_config=config)
    assert eval_chunk_sizes(pre, EvalConfig()) == want
    if curriculum:  # what the trainer's schedule draws, over steps and micro-steps
        cur = build_curriculum(model.args, confutil.from_dict(CurriculumConfig, curriculum), seed=0)
        drawn = {cur.chunk_size(s, m, accum_steps=2) for s in range(200) for m in range(2)}
        assert sorted(drawn) == want
    fixed = Pretrained(model=debug_model("debug-cat"), path=Path("c.safetensors"), tokenizer_spec="byte",
                       train_config=config)
    assert eval_chunk_sizes(fixed, EvalConfig()) == [None]


def test_eval_json_is_strict_json_when_a_loss_diverged(tmp_path):
    """A diverged model's nan/inf loss is written as null (NaN is not JSON: strict parsers and
    other languages reject the file); the CSV leaves the cell empty."""
    import json

    from cat_titan.infer.evaluate import write_table

    rows = [{"model": "m", "kind": "cat", "chunk_size": 8, "val_loss": float("nan"), "val_ppl": float("inf"),
             "tokens_per_s": 10.0}]
    _, json_path = write_table(rows, tmp_path)

    def refuse(constant):
        raise ValueError(f"{constant} in {json_path}")

    back = json.loads(json_path.read_text(), parse_constant=refuse)["rows"][0]
    assert back["val_loss"] is None and back["val_ppl"] is None and back["tokens_per_s"] == 10.0


def test_distinct_labels_use_the_shortest_path_suffix_that_differs(tmp_path, monkeypatch):
    from cat_titan.infer.pretrained import distinct_labels

    names = ["a/model.safetensors", "b/model.safetensors", "c.safetensors", "x/runs/a/y.safetensors",
             "z/runs/a/y.safetensors", "runs/solo"]
    for name in names:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name == "runs/solo":  # a run directory
            path.mkdir()
        else:
            path.write_bytes(b"")
    monkeypatch.chdir(tmp_path / "a")
    paths = ["model.safetensors", "../b/model.safetensors", *(str(tmp_path / n) for n in names[2:])]
    assert distinct_labels(paths) == ["a/model", "b/model", "c", "x/runs/a/y", "z/runs/a/y", "solo"]
    assert distinct_labels(paths[:1] * 2) == [str(tmp_path / "a" / "model")] * 2  # the same file twice
