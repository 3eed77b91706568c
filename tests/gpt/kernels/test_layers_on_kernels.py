"""The layers that use our kernels give the numbers they give on PyTorch's, and decoding with and
without our kernels picks the same tokens."""

import pytest
import torch

import gpt
import gpt.kernels as kernels
from gpt.linear import Linear
from gpt.quantization import Int8Linear, qlinear_available

needs_kernels = pytest.mark.skipif(
    not kernels.f32_available(), reason=f"no native kernels here: {kernels.status()}"
)


@needs_kernels
@pytest.mark.parametrize(
    "rows", [1, 5]
)  # several rows run on our kernel where oneDNN int8 is inexact (no VNNI)
def test_an_int8_layer_gives_the_same_numbers_on_our_kernel_and_on_torchs(monkeypatch, rows):
    layer = Int8Linear.from_float(torch.randn(300, 200) * 0.05, torch.randn(300) * 0.1)
    x = torch.randn(rows, 200) * torch.logspace(-2, 2, rows)[:, None]
    with torch.inference_mode():
        ours = layer(x)
        monkeypatch.setattr(kernels, "_isa", lambda: 0)
        assert torch.equal(ours, layer(x))


@needs_kernels
def test_a_float32_layer_on_our_kernel_stays_within_rounding_of_torchs(monkeypatch):
    layer = Linear(768, 768)  # big enough for the fast paths (small layers stay on F.linear)
    x = torch.randn(1, 1, 768)
    with torch.no_grad():
        ours = layer(x)
        assert ours.shape == (1, 1, 768)
        monkeypatch.setattr(kernels, "_isa", lambda: 0)
        torch.testing.assert_close(ours, layer(x), atol=1e-5, rtol=1e-5)
        monkeypatch.undo()
        torch.testing.assert_close(
            layer(x.expand(3, 1, 768))[1], ours[0], atol=1e-5, rtol=1e-5
        )  # oneDNN, 3 rows


@needs_kernels
def test_training_never_runs_on_our_kernel():
    layer = Linear(768, 768)
    x = torch.randn(1, 768, requires_grad=True)
    layer(x).sum().backward()  # our op has no backward: with grad enabled the layer must not call it
    assert x.grad is not None and layer.weight.grad is not None


@needs_kernels
def test_the_kernels_copies_of_the_weight_follow_it_through_loading_and_in_place_edits():
    layer, other = (Int8Linear.from_float(torch.randn(40, 64)) for _ in range(2))
    x = torch.randn(1, 64)
    with torch.inference_mode():
        expected = other(x)
        layer.load_state_dict(other.state_dict())
        assert "weight_sum" not in layer.state_dict() and "weight_rows" not in layer.state_dict()  # derived
        assert torch.equal(layer(x), expected)
    with torch.no_grad():
        layer.weight_q[0].neg_()
        other.weight_q[0].neg_()
        other._sum_weights()
    with torch.inference_mode():
        assert torch.equal(layer(x), other(x))


@needs_kernels
def test_a_quantized_checkpoint_decodes_the_same_with_and_without_our_kernels(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = gpt.build_model(gpt.ModelConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64))
    gpt.quantize(model, "int8")
    gpt.save(model, tmp_path / "m", tokenizer="byte")
    loaded, _ = gpt.load(tmp_path / "m")  # load_state_dict into fresh int8 layers: the sums follow
    prompt = [[1, 2, 3, 4]]

    def greedy():
        with torch.inference_mode():
            cache = loaded.new_cache(1)
            logits = [loaded.start(prompt, cache)]
            for _ in range(8):
                logits.append(loaded.step(logits[-1].argmax(-1).view(1, 1), cache))
            return torch.cat([t.view(1, -1) for t in logits])

    ours = greedy()
    # only the int8 products change hands (to torch._int_mm): the attention kernel stays, since
    # ours and PyTorch's agree within rounding, not to the bit (seen on an AVX2 CPU)
    monkeypatch.setattr(kernels, "int8_available", lambda: False)
    assert torch.equal(ours, greedy())


@needs_kernels
@pytest.mark.parametrize("preset", ["gpt-tiny", "seq2seq-tiny"])
def test_decoding_on_our_attention_stays_within_rounding_of_torchs(preset, monkeypatch):
    model = gpt.build_model(gpt.preset(preset)).eval()
    tok = gpt.get_tokenizer("byte")
    prompts = ["Once upon a time", "x", "rows of different lengths"]
    params = [gpt.SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True) for n in (20, 7, 12)]
    with torch.inference_mode():
        ours = gpt.complete(model, tok, prompts, params)
        monkeypatch.setattr(kernels, "_isa", lambda: 0)
        theirs = gpt.complete(model, tok, prompts, params)
    assert [c.token_ids for c in ours] == [c.token_ids for c in theirs]
    for a, b in zip(ours, theirs):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


needs_f16_attention = pytest.mark.skipif(
    not kernels.attention_f16_available(), reason=f"no float16-cache attention kernel: {kernels.status()}"
)


def _decode_logits(model, prompts, cache, n=10):
    """Each greedy step's logits of `prompts` decoded together in `cache` (rows 0..B-1)."""
    tok, rows, out = gpt.get_tokenizer("byte"), slice(0, len(prompts)), []
    with torch.inference_mode():
        logits = model.start([tok.encode(p) for p in prompts], cache, rows=rows)
        for _ in range(n):
            out.append(logits.float())
            logits = model.step(logits.argmax(-1)[:, None], cache, rows=rows)
    return torch.stack(out)


@needs_f16_attention
@pytest.mark.parametrize("preset", ["gpt-tiny", "seq2seq-tiny"])
def test_a_float16_cache_decodes_like_torch_on_the_same_halves_and_near_a_float32_cache(preset, monkeypatch):
    """Our kernel on a float16 cache against PyTorch's attention on the same cache (converted to
    float32 as it reads): only float32 rounding apart. Against a float32 cache: the halves'
    rounding apart, and the same greedy tokens."""
    model = gpt.build_model(gpt.preset(preset)).eval()
    prompts = ["Once upon a time", "x", "rows of different lengths"]
    half = _decode_logits(model, prompts, model.new_cache(3, dtype=torch.float16))
    full = _decode_logits(model, prompts, model.new_cache(3))
    monkeypatch.setattr(kernels, "_isa", lambda: 0)
    theirs = _decode_logits(model, prompts, model.new_cache(3, dtype=torch.float16))
    torch.testing.assert_close(half, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(half, full, atol=5e-3, rtol=0)
    assert torch.equal(half.argmax(-1), full.argmax(-1))


@needs_kernels
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("drafts", [[8], [6, 3, 5]])
@pytest.mark.parametrize("vocab", [256, 16384])  # 16384 x 32: an output layer oneDNN takes batches of
def test_a_forward_over_several_new_tokens_gives_each_the_logits_of_decoding_it_alone(int8, drafts, vocab):
    # to the bit: what lets a kept speculative draft change nothing in the output (gpt.speculative);
    # several rows of different lengths too, against steps of those rows decoded together
    if len(drafts) > 1 and (qlinear_available() if int8 else vocab > 256):
        pytest.skip("a batch of these rows runs on oneDNN, and one row on our kernel")
    torch.manual_seed(0)
    model = gpt.build_model(gpt.preset("gpt-tiny", vocab_size=vocab)).eval()
    if int8:
        gpt.quantize(model)
    B, T = len(drafts), max(drafts)
    prompts = [list(range(10 + b, 40 + 3 * b)) for b in range(B)]
    new = torch.randint(0, 100, (B, T))
    cache = model.new_cache(2 * B)
    with torch.inference_mode():
        for b in range(2 * B):
            model.start([prompts[b % B]], cache, rows=slice(b, b + 1))
        alone = torch.stack([model.step(new[:, t : t + 1], cache, rows=slice(0, B)) for t in range(T)], 1)
        n = torch.tensor(drafts)
        together = model.step(new, cache, rows=slice(B, 2 * B), n_tokens=n, every=True)
    for b, d in enumerate(drafts):
        assert torch.equal(alone[b, :d], together[b, :d])
