"""Hugging Face GPT-2 import/export: our GPT must reproduce transformers' GPT2LMHeadModel."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from gpt.checkpoint import CheckpointError, load  # noqa: E402
from gpt.config import preset  # noqa: E402
from gpt.hf import export_hf_gpt2, load_hf_gpt2  # noqa: E402
from gpt.model import GPT  # noqa: E402

HF_CONFIGS = {
    "small-vocab": dict(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab_size=1000),
    "gpt2-vocab": dict(n_layer=3, n_head=4, n_embd=96, n_positions=64, vocab_size=50257),
    "untied-n_inner": dict(
        n_layer=2,
        n_head=4,
        n_embd=32,
        n_positions=64,
        vocab_size=500,
        n_inner=80,
        tie_word_embeddings=False,
        layer_norm_epsilon=1e-4,
    ),
}


def _hf_model(seed=0, **kw):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        **kw,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        # With the default 0.02 the blocks barely move the residual stream, so a tied model
        # just repeats its input token; larger weights make greedy decoding worth comparing.
        initializer_range=0.2,
    )
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        # Initialisation leaves biases at zero and LayerNorm gains at one, which would hide a
        # bias or gain that was dropped or swapped; make every one of them matter.
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.05)
            elif "ln_" in name:
                p.normal_(1.0, 0.1)
        if not config.tie_word_embeddings:
            model.lm_head.weight.normal_(0.0, 0.05)
    return model.eval()


def _write_bin(model, path, *, prefix=True, old_buffers=True):
    """A pytorch_model.bin as older transformers wrote it: lm_head included, mask buffers kept."""
    path.mkdir()
    model.config.save_pretrained(path)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    if old_buffers:
        for i in range(model.config.n_layer):
            n = model.config.n_positions
            sd[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
            sd[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    if not prefix:  # GPT2Model layout: no "transformer." and no lm_head
        sd = {k[len("transformer.") :]: v for k, v in sd.items() if k.startswith("transformer.")}
    torch.save(sd, path / "pytorch_model.bin")
    return path


def _ids(vocab, shape=(2, 20), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _assert_same_logits(ours, theirs, vocab):
    ids = _ids(vocab)
    with torch.no_grad():
        diff = (ours(ids) - theirs(ids).logits).abs().max().item()
    assert diff <= 1e-4, diff


def _greedy(model, prompt, n):
    cache = model.new_cache(1)
    with torch.no_grad():
        logits = model.start([prompt], cache)
        out = []
        for _ in range(n):
            nxt = logits.argmax(-1)
            out.append(int(nxt))
            logits = model.step(nxt[:, None], cache)
    return out


@pytest.mark.parametrize("name", HF_CONFIGS)
def test_safetensors_import_matches_transformers_logits_and_greedy_generation(tmp_path, name):
    hf = _hf_model(**HF_CONFIGS[name])
    hf.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "model.safetensors").is_file()

    model, tok = load(tmp_path / "hf")
    assert isinstance(model, GPT) and not model.training and tok.name == "gpt2"
    assert model.config.tie_embeddings == hf.config.tie_word_embeddings
    _assert_same_logits(model, hf, hf.config.vocab_size)

    prompt = _ids(hf.config.vocab_size, (1, 7), seed=2)
    with torch.no_grad():
        theirs = hf.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            do_sample=False,
            max_new_tokens=32,
            min_new_tokens=32,
            pad_token_id=0,
        )[0, 7:].tolist()
    ours = _greedy(model, prompt[0].tolist(), 32)
    assert ours == theirs
    assert len(set(ours)) >= 8  # a varied continuation, not one token repeated


@pytest.mark.parametrize("name", ["small-vocab", "untied-n_inner"])
def test_pytorch_model_bin_with_old_buffers_matches_transformers(tmp_path, name):
    hf = _hf_model(**HF_CONFIGS[name])
    path = _write_bin(hf, tmp_path / "bin")
    model, config = load_hf_gpt2(path)
    assert config.tokenizer == "gpt2" and config.block_size == hf.config.n_positions
    _assert_same_logits(model, hf, hf.config.vocab_size)


def test_gpt2model_checkpoint_without_prefix_or_lm_head_loads_tied(tmp_path):
    hf = _hf_model(**HF_CONFIGS["small-vocab"])
    path = _write_bin(hf, tmp_path / "base", prefix=False, old_buffers=False)
    model, _ = load_hf_gpt2(path)
    assert model.lm_head.weight is model.transformer.wte.weight
    _assert_same_logits(model, hf, hf.config.vocab_size)


def test_hf_import_prefers_safetensors_and_never_unpickles_it(tmp_path, monkeypatch):
    hf = _hf_model(**HF_CONFIGS["small-vocab"])
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"not a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    model, _ = load_hf_gpt2(tmp_path / "hf")
    _assert_same_logits(model, hf, hf.config.vocab_size)


def test_dtype_argument_converts_hf_weights(tmp_path):
    hf = _hf_model(**HF_CONFIGS["small-vocab"])
    hf.save_pretrained(tmp_path / "hf")
    model, _ = load_hf_gpt2(tmp_path / "hf", dtype=torch.bfloat16)
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16


def test_export_then_transformers_from_pretrained_gives_the_same_logits(tmp_path):
    torch.manual_seed(3)
    ours = GPT(preset("gpt-tiny", d_ff=80)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    export_hf_gpt2(ours, tmp_path / "out")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    _assert_same_logits(ours, hf, 257)
    back, config = load_hf_gpt2(tmp_path / "out")
    assert config.d_ff == 80
    for k, v in ours.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_export_refuses_models_gpt2_cannot_express(tmp_path):
    with pytest.raises(ValueError, match="pos_encoding"):
        export_hf_gpt2(GPT(preset("gpt-tiny", pos_encoding="rotary")), tmp_path / "x")


def _hf_dir(tmp_path, **config_changes):
    hf = _hf_model(**HF_CONFIGS["small-vocab"])
    hf.save_pretrained(tmp_path / "hf")
    cfg_file = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(config_changes)
    cfg_file.write_text(json.dumps(cfg))
    return tmp_path / "hf"


def test_unsupported_activation_is_rejected_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="config.json: activation_function 'relu' is not supported"):
        load(_hf_dir(tmp_path, activation_function="relu"))


@pytest.mark.parametrize("act", ["gelu_pytorch_tanh", "gelu_new"])
def test_tanh_gelu_spellings_are_accepted(tmp_path, act):
    model, _ = load_hf_gpt2(_hf_dir(tmp_path, activation_function=act))
    assert model.config.activation == "gelu"


def test_hf_config_that_does_not_match_the_weights_is_a_clear_error(tmp_path):
    path = _hf_dir(tmp_path, n_embd=32)
    with pytest.raises(
        CheckpointError,
        match=r"model.safetensors: transformer\.\S+ has shape "
        r"\(\d+, 64\), config.json says \(\d+, 32\)",
    ):
        load(path)
    path = _hf_dir(tmp_path / "more", n_layer=3)
    with pytest.raises(CheckpointError, match=r"model.safetensors: missing tensors transformer\.h\.2\."):
        load(path)


def test_hf_dir_without_weights_or_with_truncated_weights_is_a_clear_error(tmp_path):
    path = _hf_dir(tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read safetensors"):
        load(path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights found"):
        load(path)


def test_untied_hf_checkpoint_missing_lm_head_is_a_clear_error(tmp_path):
    hf = _hf_model(**HF_CONFIGS["small-vocab"])
    path = _write_bin(hf, tmp_path / "base", prefix=False)
    cfg = json.loads((path / "config.json").read_text())
    cfg["tie_word_embeddings"] = False
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="pytorch_model.bin: missing tensor lm_head.weight"):
        load_hf_gpt2(path)
