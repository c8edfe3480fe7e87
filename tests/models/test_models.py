"""Model construction, layout equivalence, backends, bad input, FLOPs. CPU, float32."""

import pytest
import torch
import torch.nn.functional as F

from cat_titan.models.args import ModelArgs
from cat_titan.models.base import ModelInputError
from cat_titan.models.masks import (CatLayout, cat_mask_mod, dense_mask, layout_mask_mod, reference_cat_mask, FX, SEP,
                                    TOK)
from cat_titan.models.registry import PRESETS, _cat_keys, build_model, flops_per_token, get_preset

DEBUG = ["debug-dense", "debug-cat", "debug-cat-adaptive", "debug-cat-layer", "debug-hybrid"]


def _reference_order(layout: CatLayout) -> torch.Tensor:
    """For each position of the reference's interleaved sequence, our decoder position."""
    t = layout.tables()
    order = []
    K = layout.num_chunks
    for k in range(K + 1):
        order.append(int(((t.kind == FX) & (t.group == k)).nonzero()))
        if layout.with_sep:
            order.append(int(((t.kind == SEP) & (t.group == k)).nonzero()))
        if k < K:
            order.extend(((t.kind == TOK) & (t.group == k)).nonzero().flatten().tolist())
    return torch.tensor(order)


@pytest.mark.parametrize("L,C,sep,pad", [(64, 8, False, 1), (64, 8, True, 1), (24, 4, False, 16), (32, 1, True, 8),
                                         (16, 16, False, 1), (48, 2, True, 128)])
def test_permuted_layout_equals_reference_mask(L, C, sep, pad):
    layout = CatLayout(L, C, sep, pad)
    t = layout.tables()
    order = _reference_order(layout)
    assert len(order) == layout.real_len and len(set(order.tolist())) == layout.real_len
    ours = dense_mask(cat_mask_mod(t), layout.length, "cpu")
    ref = reference_cat_mask(layout.real_len, C + (2 if sep else 1))
    # The mask between real positions is the reference's under the permutation.
    assert torch.equal(ours[order][:, order], ref)
    # RoPE ids are the reference's within-group positions.
    assert torch.equal(t.rope_pos[order], torch.arange(layout.real_len) % (C + (2 if sep else 1)))
    # Pad rows see only themselves; nothing real sees pads.
    n = layout.real_len
    assert torch.equal(ours[n:, :], torch.eye(layout.length, dtype=torch.bool)[n:, :])
    assert not ours[:n, n:].any()
    assert layout.length % pad == 0
    # The arithmetic mask function (the one the models use) is the table one exactly.
    assert torch.equal(dense_mask(layout_mask_mod(layout), layout.length, "cpu"), ours)


def test_attention_pair_count_matches_mask():
    for L, C, sep in [(64, 8, False), (64, 8, True), (32, 4, True), (16, 1, False)]:
        layout = CatLayout(L, C, sep)
        n = layout.real_len
        m = dense_mask(cat_mask_mod(layout.tables()), layout.length, "cpu")[:n, :n]
        assert _cat_keys(L // C, C, sep) == int(m.sum())


@pytest.mark.parametrize("name", DEBUG)
def test_meta_build_and_seeded_init(name):
    args = get_preset(name)
    a = build_model(args, seed=7)
    b = build_model(args, device="meta")
    b.to_empty(device="cpu")
    b.init_weights(seed=7)
    c = build_model(args, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if sa[k].numel() > 1)
    x = torch.randint(0, args.vocab_size, (2, 40))
    assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name", DEBUG)
def test_forward_backward_and_loss(name):
    args = get_preset(name)
    model = build_model(args, seed=0)
    x = torch.randint(0, args.vocab_size, (2, 64))
    y = torch.randint(0, args.vocab_size, (2, 64))
    for c in args.chunk_sizes or (None,):
        logits = model(x, chunk_size=c)
        assert logits.shape == (2, 64, args.padded_vocab_size)
        loss = model(x, y, chunk_size=c)
        ref = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), y.view(-1))
        torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
        model.zero_grad()
        loss.backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None]
        # adaptive: only the current size's conditioning row gets gradient, but every tensor does
        assert not dead, dead


@pytest.mark.parametrize("name", ["debug-cat", "debug-cat-adaptive", "debug-hybrid"])
def test_causality(name):
    """Changing token t changes no output before t (CAT compresses only complete past chunks)."""
    args = get_preset(name)
    model = build_model(args, seed=0)
    x = torch.randint(0, args.vocab_size, (1, 48))
    for c in args.chunk_sizes:
        base = model(x, chunk_size=c)
        for t in (0, 5, 17, 47):
            x2 = x.clone()
            x2[0, t] = (x2[0, t] + 1) % args.vocab_size
            out = model(x2, chunk_size=c)
            assert torch.equal(out[:, :t], base[:, :t]), (c, t)
            assert not torch.equal(out[:, t:], base[:, t:])


@pytest.mark.parametrize("name", ["debug-cat", "debug-cat-adaptive", "debug-hybrid"])
def test_odd_length_equals_prefix_of_padded(name):
    args = get_preset(name)
    model = build_model(args, seed=0)
    x = torch.randint(0, args.vocab_size, (2, 64))
    for c in args.chunk_sizes:
        full = model(x, chunk_size=c)
        torch.testing.assert_close(model(x[:, :61], chunk_size=c), full[:, :61], rtol=0, atol=1e-5)


def test_decoder_padding_does_not_change_outputs():
    args = get_preset("debug-cat-adaptive")
    a = build_model(args, seed=0)
    b = build_model(args, seed=0, decoder_pad_multiple=128)
    x = torch.randint(0, args.vocab_size, (2, 64))
    for c in args.chunk_sizes:
        torch.testing.assert_close(a(x, chunk_size=c), b(x, chunk_size=c), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["debug-dense", "debug-hybrid"])
def test_sequence_padding_does_not_change_logits_or_loss(name):
    """seq_pad_multiple (set to the TP degree under sequence parallel): the logits of the
    real positions and the mean loss equal the unpadded model's; float32, atol 1e-5 (the
    padded matmuls may block differently)."""
    args = get_preset(name)
    a = build_model(args, seed=0)
    b = build_model(args, seed=0)
    b.seq_pad_multiple = 12  # 61 -> 72 tokens (hybrid: lcm with the chunk size)
    x = torch.randint(0, args.vocab_size, (2, 61))
    y = torch.randint(0, args.vocab_size, (2, 61))
    for c in args.chunk_sizes or (None,):
        want = a(x, chunk_size=c)
        got = b(x, chunk_size=c)
        assert got.shape == want.shape == (2, 61, args.padded_vocab_size)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        torch.testing.assert_close(b(x, y, chunk_size=c), a(x, y, chunk_size=c), rtol=0, atol=1e-6)
    # no room for the padding (block_size): the unpadded length (dense) or whole chunks (hybrid)
    n = args.block_size - 1
    x = torch.randint(0, args.vocab_size, (1, n))
    torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-5)


def test_flex_equals_sdpa_forward_on_cpu():
    """FlexAttention (compiled, forward only on CPU) vs SDPA on the dense mask: same function."""
    for name in ["debug-cat-adaptive", "debug-hybrid"]:
        args = get_preset(name)
        sdpa = build_model(args.replace(attn_backend="sdpa"), seed=1)
        flex = build_model(args.replace(attn_backend="flex"), seed=1)
        x = torch.randint(0, args.vocab_size, (2, 64))
        with torch.no_grad():
            for c in args.chunk_sizes[-2:]:
                torch.testing.assert_close(flex(x, chunk_size=c), sdpa(x, chunk_size=c), rtol=0, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = build_model(get_preset("debug-cat-adaptive"), seed=0)
    x = torch.randint(0, 257, (1, 32))
    with pytest.raises(ModelInputError, match=r"chunk_size=3 is not valid.*\[1, 2, 4, 8\]"):
        model(x, chunk_size=3)
    with pytest.raises(ModelInputError, match=r"chunk_size=16 is not valid"):
        model(x, chunk_size=16)
    with pytest.raises(ModelInputError, match="exceeds the model's block_size 256"):
        model(torch.zeros(1, 300, dtype=torch.long))
    with pytest.raises(ModelInputError, match=r"token ids must lie in \[0, 512\)"):
        model(torch.full((1, 8), 600))
    with pytest.raises(ModelInputError, match="integer tensor"):
        model(torch.zeros(8))
    dense = build_model(get_preset("debug-dense"), seed=0)
    with pytest.raises(ModelInputError, match="has no chunks"):
        dense(x, chunk_size=8)


def test_invalid_args_listed_together():
    bad = ModelArgs(kind="cat_adaptive", dim=100, n_heads=8, chunk_size=6, block_size=64, compressor_dim=30,
                    compressor_heads=4, dim_fx=50)
    problems = bad.validate()
    text = "\n".join(problems)
    assert "model.n_heads=8 must divide model.dim=100" in text
    assert "power of two" in text
    assert "compressor_heads=4" in text
    assert "dim_fx=50" in text
    with pytest.raises(ValueError, match="invalid model arguments"):
        build_model(bad)


def test_flops_formula():
    # dense: 6 * (block + head) MACs + 12 * width * causal pairs / L
    a = get_preset("debug-dense")
    L = 128
    hd = a.dim // a.n_heads
    block = a.dim * (a.n_heads + 2 * a.kv_heads) * hd + a.dim * a.dim + 3 * a.dim * a.ffn_dim
    want = 6 * (a.n_layers * block + a.dim * a.padded_vocab_size) + 12 * a.n_layers * a.dim * (L + 1) / 2
    assert flops_per_token(a, L) == pytest.approx(want)
    # CAT: larger chunks -> fewer decoder positions and attention pairs -> fewer FLOPs
    c = get_preset("cat-adaptive-150m")
    f = [flops_per_token(c, 2048, cs) for cs in (4, 8, 16, 32)]
    assert f == sorted(f, reverse=True)
    ref = get_preset("cat-150m")
    assert 2.3e9 < flops_per_token(ref, 2048) < 3.3e9  # ~6 x 0.43B params on 2305/2048 positions


def test_presets_valid_and_sized():
    for name, args in PRESETS.items():
        assert not args.validate(), (name, args.validate())
    m = build_model(get_preset("cat-150m"), device="meta")
    n = m.num_params(exclude_embeddings=True)
    assert 300e6 < n < 450e6, n


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_short_attention_equals_sdpa(hq, hkv):
    """The compressor's matmul-softmax attention is SDPA's function (float32, 1e-6)."""
    from cat_titan.models.common import short_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, hq, 9, 16, generator=g)
    k, v = (torch.randn(6, hkv, 9, 16, generator=g) for _ in range(2))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)
    assert torch.allclose(short_attention(q, k, v), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", DEBUG)
def test_rope_tables_stay_float32_under_bf16_cast(name):
    """model.to(bf16) (export's loader, parity, bench_generate) used to round the cos/sin tables to
    bf16; they stay float32, exactly rope_table's values, and still follow device moves."""
    from cat_titan.models.base import RopeBuffer
    from cat_titan.models.common import rope_table

    model = build_model(get_preset(name), seed=0).to(torch.bfloat16)
    tables = [m for m in model.modules() if isinstance(m, RopeBuffer)]
    assert tables
    for t in tables:
        cos, sin = rope_table(t.n_elem, t.length, t.base)
        assert t.cos.dtype == t.sin.dtype == torch.float32
        assert torch.equal(t.cos, cos) and torch.equal(t.sin, sin)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16
    meta = build_model(get_preset(name), device="meta").to(torch.bfloat16)
    assert all(m.cos.device.type == "meta" and m.cos.dtype == torch.float32
               for m in meta.modules() if isinstance(m, RopeBuffer))


@pytest.mark.parametrize("name", ["debug-cat", "debug-cat-adaptive", "debug-hybrid"])
def test_cat_learns_through_the_compressed_chunks(name):
    """A copy task only the compressed past can solve: every chunk of C = 4 tokens repeats the
    previous chunk (the first is random, vocabulary 32), so a chunk's first token is predictable
    from the compressed previous chunk alone (a CAT position sees no raw token of earlier
    chunks). After 200 AdamW steps (float32, CPU, seed 0) that token's loss must be far below
    chance (log 32 = 3.47): measured 0.07 / 0.12 / 0.03 (CAT / adaptive / CAT layer, 200 steps,
    batch 32 x 16 tokens). A compressor cut off from the gradient stays far above it (fx
    detached: 1.28 / 0.93 for CAT / adaptive; the decoder learns to read the frozen random
    features only partly), and a decoder that cannot read its slots stays at chance: the
    forward parity with the reference fixtures cannot see a broken gradient path, this can."""
    V, C, L = 32, 4, 16
    args = get_preset(name).replace(vocab_size=V, block_size=64, chunk_size=C)  # adaptive: up to C, run at C
    model = build_model(args, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)

    def batch(rows):
        x = torch.randint(0, V, (rows, C), generator=g).repeat(1, L // C + 1)[:, :L + 1]
        return x[:, :-1], x[:, 1:]

    for _ in range(200):
        x, y = batch(32)
        loss = model(x, y, chunk_size=C)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x, y = batch(256)
        ce = F.cross_entropy(model(x, chunk_size=C)[..., :V].reshape(-1, V), y.reshape(-1),
                             reduction="none").view(256, L)
    pos = torch.arange(L)
    starts = ((pos + 1) % C == 0) & (pos >= C)  # targets that open a chunk, after the random first chunk
    assert ce[:, starts].mean() < 0.5, (ce[:, starts].mean().item(), ce[:, ~starts & (pos >= C)].mean().item())
