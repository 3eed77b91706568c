"""gpt.checkpointing: with activation checkpointing the blocks keep fewer tensors for the
backward pass, and the loss and gradients are the plain model's, for both model kinds and with
LoRA adapters; evaluation and no-grad forward passes run the blocks as usual."""

import pytest
import torch
import torch.nn.functional as F

import gpt
from gpt import checkpointing, lora
from gpt.layers import Block


def _batch(preset):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 257, (3, 12), generator=g)
    y = torch.randint(0, 257, (3, 12), generator=g)
    if preset == "gpt-tiny":
        return lambda m: F.cross_entropy(m(x).flatten(0, 1), y.flatten())
    src = torch.randint(0, 257, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False  # a padded source
    return lambda m: F.cross_entropy(m(src, x, mask).flatten(0, 1), y.flatten())


def _loss_grads_saved(model, loss_fn):
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(saved)


@pytest.mark.parametrize("preset", ["gpt-tiny", "seq2seq-tiny"])
@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_the_loss_and_gradients_are_the_plain_models_and_fewer_activations_are_kept(preset, adapters):
    torch.manual_seed(0)
    model = gpt.build_model(gpt.preset(preset, dropout=0.0)).train()
    if adapters:
        lora.apply(model, rank=4)
        with torch.no_grad():  # B starts at zero: give the adapters' A a gradient too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    loss_fn = _batch(preset)
    loss, grads, kept = _loss_grads_saved(model, loss_fn)
    n = checkpointing.enable(model)
    assert n == (2 if preset == "gpt-tiny" else 4)
    loss_ckpt, grads_ckpt, kept_ckpt = _loss_grads_saved(model, loss_fn)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-6, rtol=0)
    assert grads_ckpt.keys() == grads.keys() and (not adapters or all("lora_" in k for k in grads))
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-6, rtol=0, msg=name)
    assert kept_ckpt < kept / 2, (kept_ckpt, kept)  # the blocks' activations are not kept
    checkpointing.enable(model, on=False)
    assert not any(b.checkpointing for b in model.modules() if isinstance(b, Block))
    assert _loss_grads_saved(model, loss_fn)[2] == kept


def test_evaluation_and_no_grad_run_the_blocks_as_usual(monkeypatch):
    model = gpt.build_model(gpt.preset("gpt-tiny"))
    checkpointing.enable(model)
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(
        "gpt.layers.checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k), raising=True
    )
    x = torch.randint(0, 257, (2, 8))
    with torch.no_grad():
        model.train()(x)
    model.eval()(x)
    assert calls == []
    model.train()(x).sum().backward()
    assert len(calls) == 2
    model.eval().start([[1, 2, 3]], model.new_cache(1))  # cached decoding
    assert len(calls) == 2


def test_blocks_whose_activations_are_large_enough_for_our_gelu_kernel_checkpoint_too():
    """The kernel's op and torch.utils.checkpoint disagree on the tensors it saves; checkpointed
    blocks keep PyTorch's GELU (gpt.activations), and the gradients stay the plain model's."""
    torch.manual_seed(0)
    model = gpt.build_model(gpt.ModelConfig(vocab_size=300, block_size=64, n_layer=2, n_head=2, n_embd=64))
    x = torch.randint(0, 300, (8, 64))  # 8 x 64 x 256 GELU inputs: the kernel's size (where it runs)
    loss_fn = lambda m: F.cross_entropy(m(x).flatten(0, 1), x.flatten())  # noqa: E731
    loss, grads, _ = _loss_grads_saved(model.train(), loss_fn)
    checkpointing.enable(model)
    loss_ckpt, grads_ckpt, _ = _loss_grads_saved(model, loss_fn)
    torch.testing.assert_close(loss_ckpt, loss, atol=1e-5, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
