"""int8 weights: what gpt.quantize changes, what it must not, and that it keeps the model's quality."""

import inspect
import json

import pytest
import torch
import torch.nn.functional as F

import gpt
import gpt.quantization as quantization
from gpt import kernels
from gpt.cli import main as generate_main
from gpt.quantization import Int8Linear, quantize_rows

BYTES = gpt.get_tokenizer("byte")


def _copy(model):
    twin = gpt.build_model(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def test_a_row_gives_the_same_result_alone_and_beside_a_row_of_huge_activations():
    layer = Int8Linear.from_float(torch.randn(48, 32) * 0.05, torch.randn(48) * 0.1)
    x = torch.randn(3, 32)
    loud = torch.cat([x[:1] * 1000, x[1:]])
    assert torch.equal(layer(x)[1:], layer(loud)[1:])  # one scale per row: nothing leaks across rows
    assert torch.equal(layer(x[1:2]), layer(x)[1:2])


def test_an_int8_layer_stays_close_to_the_float_one():
    w, b, x = torch.randn(64, 96) * 0.05, torch.randn(64) * 0.1, torch.randn(5, 7, 96)
    layer = Int8Linear.from_float(w, b)
    ref = F.linear(x, w, b)
    assert layer(x).shape == ref.shape
    assert (layer(x) - ref).abs().max() < 0.02 * ref.abs().max()
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and scale.shape == (64, 1)


def test_without_an_int8_kernel_the_layer_falls_back_to_weight_only(monkeypatch):
    layer = Int8Linear.from_float(torch.randn(64, 96) * 0.05, torch.randn(64) * 0.1)
    x = torch.randn(4, 96)
    fast = layer(x)
    monkeypatch.setattr(quantization, "int_mm_available", lambda device: False)
    monkeypatch.setattr(quantization.kernels, "int8_available", lambda: False)
    slow = layer(x)
    assert torch.allclose(slow, x @ layer.dequantized_weight().t() + layer.bias, atol=1e-5)
    assert (fast - slow).abs().max() < 0.02 * slow.abs().max()


needs_qlinear = pytest.mark.skipif(
    not quantization.qlinear_available(),
    reason="this build has no oneDNN int8 linear (onednn::qlinear_pointwise)",
)


@pytest.fixture
def on_onednn(monkeypatch):
    """Calls of several rows on oneDNN's GEMM, however few (ours runs the small ones otherwise)."""
    monkeypatch.setattr(quantization, "_OURS_ROWS", 0)
    monkeypatch.setattr(quantization, "_OURS_MACS", 0)


@needs_qlinear
@pytest.mark.parametrize("rows", [2, 5, 33])
def test_a_packed_int8_layer_gives_exactly_the_unpacked_result_and_rows_alone_match_rows_in_a_batch(
    rows, on_onednn
):
    layer = Int8Linear.from_float(torch.randn(80, 96) * 0.05, torch.randn(80) * 0.1)
    x = torch.randn(rows, 96) * torch.logspace(-2, 2, rows)[:, None]  # rows of very different scales
    plain = layer(x)
    assert layer.pack(rows_hint=8) and layer.is_packed
    packed = layer(x)
    assert torch.equal(packed, plain)
    # a single row runs on _int_mm and the plain weight: still the same numbers as inside the batch
    assert all(torch.equal(layer(x[i : i + 1]), packed[i : i + 1]) for i in range(rows))


def test_without_onednn_int8_pack_declines_and_the_layer_still_runs(monkeypatch):
    monkeypatch.setattr(quantization, "qlinear_available", lambda: False)
    layer = Int8Linear.from_float(torch.randn(48, 32) * 0.05)
    x = torch.randn(4, 32)
    assert layer.pack() is False and not layer.is_packed
    assert torch.equal(layer(x), Int8Linear.from_float(layer.dequantized_weight())(x))


@needs_qlinear
@pytest.mark.skipif(not kernels.int8_available(), reason="no native int8 kernel here")
@pytest.mark.parametrize("rows", [2, 16, 17, 700])
def test_small_calls_run_on_our_kernel_large_ones_on_onednn_with_the_same_numbers(rows, monkeypatch):
    layer = Int8Linear.from_float(torch.randn(3072, 768) * 0.05, torch.randn(3072) * 0.1)
    assert layer.pack(rows_hint=32)
    x = torch.randn(rows, 768) * torch.logspace(-2, 2, rows)[:, None]
    ours = quantization.ours_is_faster(rows, 3072, 768)
    assert ours == (rows <= 16)  # 17 rows of this layer: past the multiply-adds ours wins at
    assert (layer._packed_weight(x) is None) == ours
    y = layer(x)
    monkeypatch.setattr(quantization, "ours_is_faster", lambda *shape: not ours)
    assert (layer._packed_weight(x) is None) != ours
    assert torch.equal(layer(x), y)


@needs_qlinear
def test_a_packed_int8_layer_drops_its_copy_when_the_weight_changes(on_onednn):
    layer = Int8Linear.from_float(torch.randn(48, 32) * 0.05)
    layer.pack()
    with torch.no_grad():
        layer.weight_q.mul_(-1)  # e.g. load_state_dict writing new weights in place
    x = torch.randn(3, 32)
    fresh = Int8Linear(layer.weight_q.clone(), layer.weight_scale.clone(), None)
    assert torch.equal(layer(x), fresh(x))
    assert not layer.is_packed


@needs_qlinear
def test_packing_a_quantized_model_leaves_batched_generation_unchanged():
    torch.manual_seed(0)
    model = gpt.quantize(gpt.GPT(gpt.preset("gpt-tiny")).eval())
    prompts = [list(BYTES.encode(p)) for p in ("To be, or not", "Once", "A long, long time ago in")]
    params = gpt.SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True)
    before = [c.token_ids for c in gpt.complete(model, BYTES, prompts, params)]
    n_linear = sum(isinstance(m, Int8Linear) for m in model.modules())
    assert gpt.pack_linear_weights(model) == n_linear
    assert [c.token_ids for c in gpt.complete(model, BYTES, prompts, params)] == before
    assert "weight_q" in "".join(model.state_dict()) and not any("packed" in k for k in model.state_dict())


@pytest.mark.parametrize("preset", ["gpt-tiny", "seq2seq-tiny"])
def test_every_linear_layer_and_the_head_are_quantized_but_the_embedding_stays_exact(preset):
    model = gpt.build_model(gpt.preset(preset)).eval()
    before = {n: p.clone() for n, p in model.named_parameters() if "wte" in n}
    assert gpt.quantize(model, "int8") is model and not model.training
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n])
    with pytest.raises(ValueError, match="unknown quantization"):
        gpt.quantize(gpt.build_model(gpt.preset(preset)), "int4")


@pytest.mark.parametrize("preset", ["gpt-tiny", "seq2seq-tiny"])
def test_cached_decoding_of_a_quantized_model_equals_its_full_forward(preset):
    model = gpt.quantize(gpt.build_model(gpt.preset(preset)).eval())
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (7, 3, 11)]
    cache = model.new_cache(3, max_len=40)
    with torch.no_grad():
        logits = model.start(prompts, cache)
        seqs = [[model.start_token] if model.config.is_seq2seq else list(p) for p in prompts]
        for _ in range(6):
            nxt = logits.argmax(-1)
            for i in range(3):
                seqs[i].append(int(nxt[i]))
            logits = model.step(nxt[:, None], cache)
            for i in range(3):
                if model.config.is_seq2seq:
                    full = model(torch.tensor([prompts[i]]), torch.tensor([seqs[i]]))[0, -1]
                else:
                    full = model(torch.tensor([seqs[i]]))[0, -1]
                assert (full - logits[i]).abs().max() < 1e-4


def _corpus() -> bytes:
    # Real text that ships with every Python: the sources of a few stdlib modules.
    return "".join(inspect.getsource(m) for m in (json.decoder, json.encoder, inspect)).encode()


def _train_tiny(data: torch.Tensor, steps: int = 250, block: int = 48) -> gpt.GPT:
    torch.manual_seed(0)
    model = gpt.GPT(gpt.preset("gpt-tiny", n_embd=64, n_head=4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        ix = torch.randint(0, len(data) - block - 1, (32,))
        x = torch.stack([data[i : i + block] for i in ix])
        y = torch.stack([data[i + 1 : i + block + 1] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.slow
def test_int8_keeps_a_trained_models_validation_loss_within_one_percent():
    data = torch.tensor(list(_corpus()), dtype=torch.long)
    split = int(0.9 * len(data))
    model = _train_tiny(data[:split])
    quantized = gpt.quantize(_copy(model))
    val = data[split:]
    blocks = torch.stack([val[i : i + 49] for i in range(0, len(val) - 49, 49)])
    with torch.no_grad():
        losses = [
            F.cross_entropy(m(blocks[:, :-1]).flatten(0, 1), blocks[:, 1:].flatten()).item()
            for m in (model, quantized)
        ]
    assert losses[0] < 3.0  # it learned something, or the comparison would mean little
    assert abs(losses[1] - losses[0]) / losses[0] < 0.01, losses
    params = gpt.SamplingParams(max_new_tokens=32, temperature=0, ignore_eos=True)
    prompts = ["def ", "import ", "class ", "    return "]
    a = gpt.complete(model, BYTES, prompts, params)
    b = gpt.complete(quantized, BYTES, prompts, params)
    same = sum(x == y for ca, cb in zip(a, b) for x, y in zip(ca.token_ids, cb.token_ids))
    assert same >= 0.5 * 32 * len(prompts)  # greedy decoding mostly agrees (exactness is not expected)


def test_a_quantized_checkpoint_loads_as_it_was_saved_and_is_smaller(tmp_path):
    model = gpt.GPT(gpt.preset("gpt-tiny", n_embd=64, n_head=4)).eval()
    gpt.save(model, tmp_path / "fp32")
    gpt.quantize(model)
    gpt.save(model, tmp_path / "int8")
    loaded, _ = gpt.load(tmp_path / "int8")
    assert isinstance(loaded.lm_head, Int8Linear)
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
    size = lambda p: (p / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "int8") < 0.7 * size(tmp_path / "fp32")
    with pytest.raises(ValueError, match="int8-quantized"):
        gpt.export_hf_gpt2(
            gpt.quantize(gpt.GPT(gpt.preset("gpt2", n_layer=1, n_embd=64, n_head=2))), tmp_path / "hf"
        )


def test_gpt_generate_quantize_int8_prints_what_the_library_generates(tmp_path, capsys):
    gpt.save(gpt.GPT(gpt.preset("gpt-tiny")), tmp_path / "m")
    args = ["--model", str(tmp_path / "m"), "-t", "0", "-n", "10", "--ignore-eos", "--quantize", "int8", "Hi"]
    assert generate_main(args) == 0
    model, tok = gpt.load(tmp_path / "m")
    expected = gpt.generate(gpt.quantize(model), tok, "Hi", max_new_tokens=10, temperature=0, ignore_eos=True)
    assert capsys.readouterr().out == expected + "\n"


def test_a_quantized_models_constrained_output_follows_its_schema():
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}},
        "required": ["n", "ok"],
        "additionalProperties": False,
    }
    model = gpt.quantize(gpt.GPT(gpt.preset("gpt-tiny")).eval())
    tok = gpt.get_tokenizer("byte")
    outs = gpt.complete(
        model,
        tok,
        ["a", "b", "c"],
        [
            gpt.SamplingParams(
                max_new_tokens=40, temperature=1.0, seed=s, constraint=gpt.Constraint.json_schema(schema)
            )
            for s in range(3)
        ],
    )
    assert all(o.finish_reason == "stop" for o in outs)
    for o in outs:
        value = json.loads(o.text)
        assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 99 and isinstance(value["ok"], bool)
