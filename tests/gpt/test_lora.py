"""gpt.lora: adapters start as a no-op, only they train, and merging gives a plain model whose
outputs equal the adapted one's, for both model kinds."""

import pytest
import torch

import gpt
from gpt import lora


def _randomise_adapters(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)


@pytest.mark.parametrize(
    "preset,expect",
    [
        ("gpt-tiny", {"c_attn", "c_proj", "c_fc"}),
        ("seq2seq-tiny", {"c_attn", "q_proj", "kv_proj", "c_proj", "c_fc"}),
    ],
)
def test_adapters_start_as_a_no_op_and_merge_into_a_plain_model_with_equal_outputs(preset, expect):
    model = gpt.build_model(gpt.preset(preset)).eval()
    plain_keys = list(model.state_dict())
    x = torch.randint(0, 257, (2, 9))
    run = (lambda m: m(x)) if preset == "gpt-tiny" else (lambda m: m(x, x[:, :5]))
    before = run(model)
    names = lora.apply(model, rank=4)
    assert {n.rsplit(".", 1)[-1] for n in names} == expect
    assert torch.equal(run(model), before)  # B starts at zero
    _randomise_adapters(model)
    adapted = run(model)
    assert not torch.allclose(adapted, before)
    plain = lora.merged(model)
    assert list(plain.state_dict()) == plain_keys
    assert not any(isinstance(m, lora.LoRALinear) for m in plain.modules())
    torch.testing.assert_close(run(plain), adapted, atol=1e-5, rtol=1e-5)


def test_only_adapters_and_optionally_biases_train():
    model = gpt.GPT(gpt.preset("gpt-tiny"))
    lora.apply(model, rank=2, targets=("c_attn",))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(".lora_" in n for n in names) and len(names) == 2 * model.config.n_layer
    model = gpt.GPT(gpt.preset("gpt-tiny"))
    lora.apply(model, rank=2, train_biases=True)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith(".bias") for n in names) and not any(n.endswith(".weight") for n in names)


def test_a_backward_pass_leaves_the_frozen_weights_without_gradients():
    model = gpt.GPT(gpt.preset("gpt-tiny"))
    lora.apply(model, rank=2)
    model(torch.randint(0, 257, (2, 8))).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name


def test_saved_adapters_load_into_a_freshly_adapted_model():
    a = gpt.GPT(gpt.preset("gpt-tiny"))
    b = gpt.GPT(gpt.preset("gpt-tiny"))
    b.load_state_dict(a.state_dict())
    lora.apply(a, rank=3)
    _randomise_adapters(a)
    lora.apply(b, rank=3)
    lora.load_adapters(b, lora.adapters(a))
    x = torch.randint(0, 257, (1, 6))
    torch.testing.assert_close(b(x), a(x))
    c = gpt.GPT(gpt.preset("gpt-tiny"))
    lora.apply(c, rank=3, targets=("c_fc",))
    with pytest.raises(ValueError, match="do not fit"):
        lora.load_adapters(c, lora.adapters(a))


def test_unknown_targets_and_bad_settings_are_value_errors_naming_the_layers():
    model = gpt.GPT(gpt.preset("gpt-tiny"))
    with pytest.raises(ValueError, match="c_attn"):
        lora.apply(model, rank=2, targets=("query",))
    with pytest.raises(ValueError, match="rank"):
        lora.apply(model, rank=0)
