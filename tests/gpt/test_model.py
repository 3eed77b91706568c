"""The shared layers and both models: shapes, masks, and cache-vs-full-forward equality."""

import pytest
import torch

import gpt
from gpt.positions import sinusoidal_table

VARIANTS = [(pe, norm) for pe in ("learned", "sinusoidal", "rotary") for norm in ("pre", "post")]


def _greedy_incremental_matches_full(model, prompts, steps, *, s2s=False, cache_rows=None):
    B = len(prompts)
    cache = model.new_cache(cache_rows or B, max_len=48, **({"src_len": 48} if s2s else {}))
    rows = None if cache_rows is None else torch.arange(cache_rows)[-B:].flip(0)
    with torch.no_grad():
        logits = model.start(prompts, cache, rows=rows)
        seqs = [[model.start_token] for _ in prompts] if s2s else [list(p) for p in prompts]
        worst = 0.0
        for _ in range(steps):
            nxt = logits.argmax(-1)
            for i in range(B):
                seqs[i].append(int(nxt[i]))
            logits = model.step(nxt[:, None], cache, rows=rows)
            for i in range(B):
                if s2s:
                    full = model(torch.tensor([prompts[i]]), torch.tensor([seqs[i]]))[0, -1]
                else:
                    full = model(torch.tensor([seqs[i]]))[0, -1]
                worst = max(worst, (full - logits[i]).abs().max().item())
    return worst


@pytest.mark.parametrize("pe,norm", VARIANTS)
def test_gpt_cached_decoding_equals_full_forward_for_rows_of_different_lengths(pe, norm):
    model = gpt.GPT(gpt.preset("gpt-tiny", pos_encoding=pe, norm=norm)).eval()
    prompts = [torch.randint(0, 257, (n,)).tolist() for n in (7, 2, 12)]
    assert _greedy_incremental_matches_full(model, prompts, steps=8) <= 1e-5


@pytest.mark.parametrize("pe,norm", VARIANTS)
def test_encoder_decoder_cached_decoding_equals_full_forward(pe, norm):
    model = gpt.EncoderDecoder(gpt.preset("seq2seq-tiny", pos_encoding=pe, norm=norm)).eval()
    sources = [torch.randint(0, 256, (n,)).tolist() for n in (9, 3, 14)]
    assert _greedy_incremental_matches_full(model, sources, steps=8, s2s=True) <= 1e-5


def test_cache_rows_need_not_be_the_first_or_in_order(tiny_gpt):
    prompts = [torch.randint(0, 257, (n,)).tolist() for n in (4, 6)]
    assert _greedy_incremental_matches_full(tiny_gpt, prompts, steps=5, cache_rows=5) <= 1e-5


def test_a_reset_row_is_reused_while_other_rows_carry_on(tiny_gpt):
    cache = tiny_gpt.new_cache(2, max_len=40)
    a, b, c = ([int(t) for t in torch.randint(0, 257, (n,))] for n in (5, 8, 3))
    with torch.no_grad():
        tiny_gpt.start([a, b], cache)
        for t in (1, 2, 3):  # both rows grow
            tiny_gpt.step(torch.tensor([[t], [t]]), cache)
        tiny_gpt.start([c], cache, rows=torch.tensor([0]))  # row 0 takes a new, shorter sequence
        out = tiny_gpt.step(torch.tensor([[9], [9]]), cache)
        ref_c = tiny_gpt(torch.tensor([c + [9]]))[0, -1]
        ref_b = tiny_gpt(torch.tensor([b + [1, 2, 3, 9]]))[0, -1]
    assert cache.lengths.tolist() == [len(c) + 1, len(b) + 4]
    assert (out[0] - ref_c).abs().max() <= 1e-5
    assert (out[1] - ref_b).abs().max() <= 1e-5


def test_mixed_prefill_chunks_and_decodes_in_one_forward(tiny_gpt):
    """One padded forward can extend one row by a chunk and another by a single token."""
    cache = tiny_gpt.new_cache(2, max_len=40)
    p0, p1 = [int(t) for t in torch.randint(0, 257, (10,))], [int(t) for t in torch.randint(0, 257, (4,))]
    with torch.no_grad():
        tiny_gpt.start([p0[:3], p1], cache)
        chunk = torch.tensor([p0[3:10], [7] + [0] * 6])
        out = tiny_gpt.step(chunk, cache, n_tokens=torch.tensor([7, 1]))
        assert (out[0] - tiny_gpt(torch.tensor([p0]))[0, -1]).abs().max() <= 1e-5
        assert (out[1] - tiny_gpt(torch.tensor([p1 + [7]]))[0, -1]).abs().max() <= 1e-5


def test_padding_at_the_end_of_the_cache_never_overwrites_real_keys(tiny_gpt):
    cache = tiny_gpt.new_cache(2, max_len=12)
    a = [int(t) for t in torch.randint(0, 257, (11,))]
    with torch.no_grad():
        tiny_gpt.start([a, [1]], cache)
        # Row 0 fills the last slot with 1 token while row 1 brings 4: row 0's padding goes past the end.
        out = tiny_gpt.step(torch.tensor([[5, 0, 0, 0], [2, 3, 4, 5]]), cache, n_tokens=torch.tensor([1, 4]))
        assert (out[0] - tiny_gpt(torch.tensor([a + [5]]))[0, -1]).abs().max() <= 1e-5


def test_overfilling_the_cache_is_a_clear_error(tiny_gpt):
    cache = tiny_gpt.new_cache(1, max_len=4)
    with pytest.raises(ValueError, match="exceeds the cache length 4"):
        tiny_gpt.start([[1, 2, 3, 4, 5]], cache)


@pytest.mark.parametrize("rows", [slice(1, 4), torch.tensor([3, 1, 2]), torch.tensor([2, 3, 4])])
@pytest.mark.parametrize("lengths", [[5, 5, 5], [5, 2, 9]])
def test_a_decode_step_books_the_cache_like_any_other_forward(rows, lengths):
    """One token per row takes its own short path through the cache's bookkeeping; it must give
    what the general path gives when told explicitly that every row brings one token."""
    from gpt.kv_cache import KVCache

    got, want = (KVCache(1, 5, 2, 16, 4) for _ in range(2))
    ids = torch.arange(5)[rows] if isinstance(rows, slice) else rows
    for cache in (got, want):
        cache.lengths[ids] = torch.tensor(lengths)
    view, pos, mask, causal = got.advance(3, 1, rows, None)
    view_w, pos_w, mask_w, causal_w = want.advance(3, 1, rows, torch.ones(3, dtype=torch.long))
    assert torch.equal(got.lengths, want.lengths) and torch.equal(pos, pos_w) and causal == causal_w
    assert (mask is None) == (mask_w is None) and (mask is None or torch.equal(mask, mask_w))
    assert torch.equal(view.rows, view_w.rows) and torch.equal(view.write_pos, view_w.write_pos)
    assert (view.kv_len, view.src_len) == (view_w.kv_len, view_w.src_len)
    assert str(view.select) == str(view_w.select)
    full = KVCache(1, 2, 2, 6, 4)
    full.lengths[:] = torch.tensor([3, 6])
    with pytest.raises(ValueError, match="exceeds the cache length 6"):
        full.advance(2, 1, None, None)
    assert full.lengths.tolist() == [3, 6]  # checked before anything moved


def test_beam_reorder_copies_rows_and_lengths(tiny_gpt):
    cache = tiny_gpt.new_cache(2, max_len=16)
    with torch.no_grad():
        tiny_gpt.start([[1, 2, 3], [4, 5]], cache)
        cache.reorder(torch.tensor([1, 1]))
        out = tiny_gpt.step(torch.tensor([[6], [6]]), cache)
        ref = tiny_gpt(torch.tensor([[4, 5, 6]]))[0, -1]
    assert cache.lengths.tolist() == [3, 3]
    assert (out - ref).abs().max() <= 1e-5


def test_gpt_logits_shape_and_causality(tiny_gpt):
    x = torch.randint(0, 257, (2, 10))
    y = tiny_gpt(x)
    assert y.shape == (2, 10, 257)
    x2 = x.clone()
    x2[:, 6:] = 3  # changing the future must not change the past
    assert torch.allclose(tiny_gpt(x2)[:, :6], y[:, :6], atol=1e-6)


def test_encoder_is_bidirectional_and_padding_is_ignored(tiny_s2s):
    src = torch.randint(0, 256, (1, 8))
    tgt = torch.randint(0, 256, (1, 5))
    base = tiny_s2s(src, tgt)
    changed = src.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 256
    assert not torch.allclose(tiny_s2s(changed, tgt), base)  # the last source token is seen by all
    padded = torch.cat([src, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.tensor([[True] * 8 + [False] * 3])
    assert torch.allclose(tiny_s2s(padded, tgt, src_mask=mask), base, atol=1e-5)


def test_tied_embeddings_share_storage(tiny_gpt, tiny_s2s):
    assert tiny_gpt.lm_head.weight is tiny_gpt.transformer.wte.weight
    assert tiny_s2s.lm_head.weight is tiny_s2s.wte.weight


def test_gpt2_preset_has_124m_parameters():
    with torch.device("meta"):
        model = gpt.GPT(gpt.preset("gpt2"))
    assert model.num_params() == 124_439_808


def test_transformer_base_preset_matches_the_paper():
    c = gpt.preset("transformer-base")
    assert (c.n_layer, c.n_encoder_layer, c.n_embd, c.n_head, c.d_ff) == (6, 6, 512, 8, 2048)
    assert (c.norm, c.pos_encoding, c.activation) == ("post", "sinusoidal", "relu")


def test_sinusoidal_table_follows_the_formula():
    t = sinusoidal_table(50, 16)
    pos, i = 37, 3
    assert abs(t[pos, 2 * i] - torch.sin(torch.tensor(pos / 10000 ** (2 * i / 16)))) < 1e-6
    assert abs(t[pos, 2 * i + 1] - torch.cos(torch.tensor(pos / 10000 ** (2 * i / 16)))) < 1e-6


@pytest.mark.parametrize(
    "bad,msg",
    [
        (dict(n_embd=30, n_head=4), "divisible"),
        (dict(pos_encoding="alibi"), "pos_encoding"),
        (dict(n_layer=0), "n_layer"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_invalid_configs_are_rejected_with_a_reason(bad, msg):
    with pytest.raises(ValueError, match=msg):
        gpt.preset("gpt-tiny", **bad)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="gpt2-medium"):
        gpt.preset("gpt5")


def test_too_long_input_is_rejected(tiny_gpt):
    with pytest.raises(ValueError, match="block_size"):
        tiny_gpt(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("shape", [(1, 1024), (3, 5, 1024), "transposed"])
def test_inference_linear_fast_path_matches_f_linear(shape):
    """Wide layers run inference on oneDNN's GEMM: it must compute what F.linear computes."""
    from gpt.linear import Linear

    layer = Linear(1024, 768)
    x = torch.randn(1024, 6).t() if shape == "transposed" else torch.randn(*shape)
    with torch.inference_mode():
        fast = layer(x)
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert fast.shape == ref.shape
    assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-4)


def test_cached_decoding_equals_full_forward_at_a_width_that_takes_the_fast_path():
    model = gpt.GPT(gpt.preset("gpt-tiny", n_embd=512, n_head=8, n_layer=1, vocab_size=1024)).eval()
    prompts = [torch.randint(0, 1024, (n,)).tolist() for n in (6, 3)]
    assert _greedy_incremental_matches_full(model, prompts, steps=4) <= 1e-5


@pytest.mark.parametrize("shape", [(1, 1024), (4, 1024), (3, 5, 1024), "transposed"])
def test_packed_linear_weights_compute_what_f_linear_computes(shape):
    from gpt.linear import Linear

    layer = Linear(1024, 768)
    assert layer.pack() is True
    x = torch.randn(1024, 6).t() if shape == "transposed" else torch.randn(*shape)
    with torch.inference_mode():
        fast = layer(x)
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-4)


def test_a_packed_copy_is_dropped_once_its_weight_changes():
    from gpt.linear import Linear

    layer = Linear(1024, 768)
    packed = layer.pack()
    assert layer.is_packed == packed  # False where oneDNN's linear is not available
    x = torch.randn(4, 1024)
    with torch.no_grad():
        layer.weight.mul_(2)  # e.g. a training step or load_state_dict
    with torch.inference_mode():
        out = layer(x)
    assert torch.allclose(out, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-4)
    assert not layer.is_packed
    layer.weight = torch.nn.Parameter(torch.randn(768, 1024))  # a new Parameter object altogether
    layer.pack()
    layer.weight = torch.nn.Parameter(torch.randn(768, 1024))
    with torch.inference_mode():
        out = layer(x)
    assert torch.allclose(out, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-4, rtol=1e-4)


def test_packing_skips_small_layers_and_keeps_the_state_dict():
    model = gpt.GPT(gpt.preset("gpt-tiny", n_embd=512, n_head=8, n_layer=1, vocab_size=1024)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    packed = gpt.pack_linear_weights(model)
    assert packed == sum(
        m.weight.numel() >= 1 << 19 for m in model.modules() if isinstance(m, gpt.linear.Linear)
    )
    assert packed >= 1
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def _greedy_logits(model, prompts, steps: int) -> list:
    with torch.inference_mode():
        cache = model.new_cache(len(prompts), max_len=16)
        logits = [model.start(prompts, cache)]
        for _ in range(steps):
            logits.append(model.step(logits[-1].argmax(-1)[:, None], cache))
    return logits


def test_cached_decoding_with_packed_weights_equals_the_plain_model():
    model = gpt.GPT(gpt.preset("gpt-tiny", n_embd=512, n_head=8, n_layer=2, vocab_size=1024)).eval()
    prompts = [torch.randint(0, 1024, (n,)).tolist() for n in (6, 3, 5)]
    plain = _greedy_logits(model, prompts, steps=4)
    assert gpt.pack_linear_weights(model) > 0
    packed = _greedy_logits(model, prompts, steps=4)
    assert max((a - b).abs().max().item() for a, b in zip(plain, packed)) <= 1e-4
