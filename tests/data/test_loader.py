import json

import numpy as np
import pytest
import torch

from cat_titan.data.loader import Shuffle, TokenLoader, validation_batches
from cat_titan.data.shards import DataError, ShardedTokens, write_shards
from cat_titan.data.tokenizer import get_tokenizer

SEQ = 16
GB = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """27 train documents of 97 random bytes + eot in 40-token shards: 165 windows of 16.

    165 is not a multiple of the micro-batch 4, so micro-batch 41 spans the epoch boundary.
    """
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 256, size=97) for _ in range(30)]
    out = tmp_path_factory.mktemp("loader") / "data"
    write_shards(docs, out, get_tokenizer("byte").identity(), shard_tokens=40, val_fraction=0.1)
    return out


def _step(loaders: list[TokenLoader]) -> torch.Tensor:
    """One optimizer step's samples in global order: micro-steps, then ranks within each."""
    rows = []
    for _ in range(loaders[0].accum_steps):
        rows += [loader.next_batch()[0] for loader in loaders]
    return torch.cat(rows)  # (GB, SEQ)


def _ranks(data_dir, dp_world: int, micro_batch: int, **kw) -> list[TokenLoader]:
    return [
        TokenLoader(
            data_dir, seq_len=SEQ, global_batch=GB, micro_batch=micro_batch,
            dp_rank=r, dp_world=dp_world, **kw,
        )
        for r in range(dp_world)
    ]


def test_windows_follow_the_ordering_rule(data_dir):
    tokens = ShardedTokens(data_dir)[:].astype(np.int64)
    n = (len(tokens) - 1) // SEQ
    loader = TokenLoader(data_dir, seq_len=SEQ, global_batch=GB, micro_batch=4, seed=7)
    assert loader.num_windows == n == 165
    order = np.concatenate([Shuffle(n, 7, e)(np.arange(n)) for e in range(2)])
    for b in range(60):  # 240 samples: past the epoch boundary at 165
        inputs, labels = loader.next_batch()
        assert inputs.dtype == labels.dtype == torch.int64
        assert inputs.shape == labels.shape == (4, SEQ)
        for row, w in enumerate(order[4 * b : 4 * b + 4]):
            window = tokens[w * SEQ : w * SEQ + SEQ + 1]
            assert inputs[row].tolist() == window[:-1].tolist()
            assert labels[row].tolist() == window[1:].tolist()


@pytest.mark.parametrize("dp_world,micro_batch", [(1, 4), (2, 4), (2, 2), (4, 2), (4, 1)])
def test_global_stream_is_independent_of_dp_world_and_accumulation(data_dir, dp_world, micro_batch):
    reference = _ranks(data_dir, 1, GB)  # one rank, no accumulation
    loaders = _ranks(data_dir, dp_world, micro_batch)
    assert loaders[0].accum_steps == GB // (dp_world * micro_batch)
    for _ in range(30):  # 240 samples: more than an epoch
        assert torch.equal(_step(loaders), _step(reference))


def _roundtrip(state: dict) -> dict:
    return json.loads(json.dumps(state))  # the state must survive a JSON checkpoint


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("resume_at", [13, 41, 42])  # mid-epoch; the next batch crosses; past
def test_resume_reproduces_the_next_batches(data_dir, num_workers, resume_at):
    kw = dict(seq_len=SEQ, global_batch=GB, micro_batch=4, seed=3)
    reference = TokenLoader(data_dir, **kw)
    expected = [reference.next_batch() for _ in range(resume_at + 12)]
    first = TokenLoader(data_dir, num_workers=num_workers, **kw)
    for i in range(resume_at):
        assert all(torch.equal(a, b) for a, b in zip(first.next_batch(), expected[i]))
    state = _roundtrip(first.state_dict())
    assert state["samples_consumed"] == 4 * resume_at  # prefetched batches do not count
    resumed = TokenLoader(data_dir, num_workers=num_workers, **kw)
    resumed.load_state_dict(state)
    for i in range(resume_at, resume_at + 12):
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), expected[i]))
    # restoring an earlier state into a running loader discards its prefetched batches
    for _ in range(3):
        first.next_batch()
    first.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(first.next_batch(), expected[resume_at]))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_leaves_the_global_rng_alone(data_dir, num_workers):
    """Checkpoints save torch's global generator for exact resume; the loader, and the iterator
    it starts again after load_state_dict, must not draw from it (as DataLoader's default did)."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    loader = TokenLoader(data_dir, seq_len=SEQ, global_batch=GB, micro_batch=4, num_workers=num_workers)
    for _ in range(3):
        loader.next_batch()
    loader.load_state_dict(_roundtrip(loader.state_dict()))  # what a resume does
    loader.next_batch()
    assert torch.equal(torch.get_rng_state(), before)


def test_state_restores_under_another_dp_world(data_dir):
    original = _ranks(data_dir, 2, 4)
    for _ in range(20):
        _step(original)
    states = [_roundtrip(loader.state_dict()) for loader in original]
    assert states[0] == states[1]  # the state is global, any rank's will do
    expected = [_step(original) for _ in range(10)]
    for dp_world, micro_batch in [(4, 2), (1, 4), (4, 1)]:
        loaders = _ranks(data_dir, dp_world, micro_batch, num_workers=0)
        for loader in loaders:
            loader.load_state_dict(states[0])
        for want in expected:
            assert torch.equal(_step(loaders), want)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 165, 1000, 4097, 65536, 100_003])
def test_shuffle_is_a_bijection_keyed_by_seed_and_epoch(n):
    order = Shuffle(n, 7, 0)(np.arange(n))
    assert sorted(order.tolist()) == list(range(n))
    assert np.array_equal(Shuffle(n, 7, 0)(np.arange(n)), order)  # a pure function of (n, seed, epoch)
    if n >= 1000:
        assert not np.array_equal(Shuffle(n, 7, 1)(np.arange(n)), order)
        assert not np.array_equal(Shuffle(n, 8, 0)(np.arange(n)), order)
        assert abs(np.corrcoef(order, np.arange(n))[0, 1]) < 0.05  # no trace of the input order
        assert (order == np.arange(n)).mean() < 0.01


def test_shuffle_needs_no_memory_per_window():
    """1T tokens at seq_len 2048: any index evaluates alone, without an N-sized table."""
    n = 488_281_250
    s = Shuffle(n, 0, 3)
    some = s(np.array([0, 1, n - 1]))
    assert ((0 <= some) & (some < n)).all() and len(set(some.tolist())) == 3
    with pytest.raises(IndexError):
        s(np.array([n]))


def test_version_1_state_resumes_in_its_original_order(data_dir):
    """Checkpoints written before the Feistel shuffle continue the numpy-permutation stream."""
    tokens = ShardedTokens(data_dir)[:].astype(np.int64)
    kw = dict(seq_len=SEQ, global_batch=GB, micro_batch=4, seed=5)
    loader = TokenLoader(data_dir, **kw)
    state = {**loader.state_dict(), "version": 1, "samples_consumed": 160}  # 5 samples before the epoch ends
    loader.load_state_dict(state)
    n = loader.num_windows
    order = np.concatenate([np.random.default_rng([5, e]).permutation(n) for e in range(2)])
    for b in range(4):
        inputs, _ = loader.next_batch()
        for row, w in enumerate(order[160 + 4 * b: 164 + 4 * b]):
            assert inputs[row].tolist() == tokens[w * SEQ: w * SEQ + SEQ].tolist()
    assert loader.state_dict()["version"] == 1  # and it is saved as what it is
    with pytest.raises(DataError, match="version 99"):
        TokenLoader(data_dir, **kw).load_state_dict({**state, "version": 99})


def test_mismatched_state_raises(data_dir, tmp_path):
    base = dict(seq_len=SEQ, global_batch=GB, micro_batch=4, seed=1)
    loader = TokenLoader(data_dir, **base)
    loader.next_batch()
    state = loader.state_dict()
    for field, kw in [
        ("seq_len", dict(seq_len=SEQ + 1)),
        ("seed", dict(seed=2)),
        ("global_batch", dict(global_batch=2 * GB)),
    ]:
        other = TokenLoader(data_dir, **{**base, **kw})
        with pytest.raises(DataError, match=f"cannot resume the data loader: {field} is"):
            other.load_state_dict(state)
    # same sizes, different tokens: only the fingerprint tells them apart
    tokens = ShardedTokens(data_dir)[:]
    flipped = np.where(tokens < 256, tokens ^ 1, tokens)[:-1]  # [:-1]: write_shards adds the eot
    write_shards([flipped], tmp_path / "flipped", get_tokenizer("byte").identity(), val_fraction=0)
    other = TokenLoader(tmp_path / "flipped", **base)
    assert other.num_windows == loader.num_windows
    with pytest.raises(DataError, match="data_fingerprint is"):
        other.load_state_dict(state)
    # taken half-way through a step (1 of 2 micro-steps): a layout of whole steps cannot continue
    one_rank = TokenLoader(data_dir, seq_len=SEQ, global_batch=GB, micro_batch=GB, seed=1)
    with pytest.raises(DataError, match="4 samples into a step"):
        one_rank.load_state_dict(state)


def test_bad_settings_are_explained(data_dir):
    with pytest.raises(DataError, match="global_batch 8 is not a multiple of micro_batch 3 x dp_w"):
        TokenLoader(data_dir, seq_len=SEQ, global_batch=GB, micro_batch=3)
    with pytest.raises(DataError, match=r"dp_rank must lie in \[0, dp_world=2\), got 2"):
        TokenLoader(data_dir, seq_len=SEQ, global_batch=GB, micro_batch=4, dp_rank=2, dp_world=2)
    n = ShardedTokens(data_dir).num_tokens
    with pytest.raises(DataError, match=f"has {n} tokens, too few for seq_len {n}"):
        TokenLoader(data_dir, seq_len=n, global_batch=GB, micro_batch=4)


def test_validation_batches(data_dir):
    val = ShardedTokens(data_dir, "val")
    tokens = val[:].astype(np.int64)
    full = validation_batches(data_dir, SEQ, 4)
    assert len(full) == ((len(tokens) - 1) // SEQ) // 4 >= 2
    for b, (inputs, labels) in enumerate(full):  # windows 0, 1, 2, ... unshuffled
        for row in range(4):
            w = 4 * b + row
            assert inputs[row].tolist() == tokens[w * SEQ : w * SEQ + SEQ].tolist()
            assert labels[row].tolist() == tokens[w * SEQ + 1 : w * SEQ + SEQ + 1].tolist()
    two = [validation_batches(val, SEQ, 4, max_batches=2, dp_rank=r, dp_world=2) for r in range(2)]
    assert len(two[0]) == len(two[1]) == 2
    for b in range(2):
        assert torch.equal(torch.cat([two[0][b][0], two[1][b][0]]), full[b][0])
    with pytest.raises(DataError, match="fewer than one validation batch of 1000"):
        validation_batches(val, SEQ, 1000)
