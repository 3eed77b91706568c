"""The feed-forward sublayer computes its activation again in the backward pass instead of
keeping it (gpt.layers.MLP): the gradients are the same, the d_ff-wide tensor is not kept, and
activation checkpointing, which recomputes the whole block, turns it off."""

import pytest
import torch
import torch.nn.functional as F

import gpt
from gpt import checkpointing, lora
from gpt.layers import MLP


def _model(adapters: bool):
    torch.manual_seed(0)
    model = gpt.GPT(gpt.preset("gpt-tiny", dropout=0.1)).train()
    if adapters:
        lora.apply(model, 4)
    return model


def _grads(model, recompute: bool) -> list[torch.Tensor]:
    for m in model.modules():
        if isinstance(m, MLP):
            m.recompute_activation = recompute
    idx = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_gradients_are_the_same_as_when_the_activation_is_kept(adapters):
    model = _model(adapters)
    for a, b in zip(_grads(model, False), _grads(model, True)):
        assert torch.allclose(a, b, atol=1e-6)


def test_the_activations_output_is_not_kept(monkeypatch):
    kept = []  # what c_proj's saved tensors became
    hooks = torch.autograd.graph.saved_tensors_hooks

    def spy(pack, unpack):
        return hooks(lambda t: kept.append(pack(t)) or kept[-1], unpack)

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", spy)
    mlp = _model(False).transformer.h[0].mlp
    x = torch.randn(4, 64, mlp.c_fc.in_features, requires_grad=True)
    mlp(x).sum().backward()
    wide = 4 * 64 * mlp.c_fc.out_features
    assert any(isinstance(o, tuple) for o in kept)  # kept as the activation's input, to recompute
    assert not [o for o in kept if isinstance(o, torch.Tensor) and o.numel() == wide]


def test_activation_checkpointing_turns_it_off_and_back_on():
    model = _model(False)
    mlps = [m for m in model.modules() if isinstance(m, MLP)]
    checkpointing.enable(model)
    assert not any(m.recompute_activation for m in mlps)
    checkpointing.enable(model, False)
    assert all(m.recompute_activation for m in mlps)
