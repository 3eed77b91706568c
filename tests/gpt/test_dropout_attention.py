"""Causal attention with dropout a block of queries at a time (gpt.dropout_attention): its output
and gradients are the plain computation's with the same dropout mask, a GPT trains through it,
and activation checkpointing recomputes the same mask."""

import pytest
import torch
import torch.nn.functional as F

import gpt
from gpt import checkpointing, dropout_attention
from gpt.dropout_attention import causal_dropout_attention, dropped_fraction, keep_mask


def _reference(q, k, v, p, seed, block):
    """The math path, in float64, with the blocks' masks laid out over the whole square."""
    B, H, T, D = q.shape
    keep = torch.zeros(B, H, T, T, dtype=torch.bool)
    for index, start in enumerate(range(0, T, block)):
        end = min(start + block, T)
        keep[:, :, start:end, :end] = keep_mask(seed, index, torch.Size((B, H, end - start, end)), p)
    q, k, v = (t.double() for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / D**0.5
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return (scores.softmax(-1) * keep / (1 - dropped_fraction(p))) @ v


def _inputs(B=2, H=3, T=37, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, requires_grad=True) for _ in range(3)]


@pytest.mark.parametrize("block, p", [(16, 0.1), (5, 0.5), (64, 0.3)])
def test_output_and_gradients_are_the_plain_computations_with_the_same_mask(block, p):
    q, k, v = _inputs()
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())  # the draw the forward makes
    torch.manual_seed(7)
    out = causal_dropout_attention(q, k, v, p, block)
    ref = _reference(q, k, v, p, seed, block)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(got, want):
        assert torch.allclose(a, b.to(a.dtype), atol=1e-5)


def test_a_causal_query_never_sees_a_later_key():
    q, k, v = _inputs(T=20)
    out = causal_dropout_attention(q, k, v, 0.2, 8)
    (grad_v,) = torch.autograd.grad(out[:, :, 9].sum(), v)
    assert grad_v[:, :, 10:].abs().max() == 0


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_about_p_of_the_probabilities_are_dropped_at_every_position(p):
    keep = keep_mask(123, 0, torch.Size((64, 12, 128, 24)), p).float()
    assert abs(1 - keep.mean().item() - p) < 0.002
    # each of the three random lanes of a draw, and no lane pattern across positions
    by_lane = keep.reshape(-1)[: keep.numel() // 3 * 3].view(-1, 3).mean(0)
    assert (by_lane - (1 - p)).abs().max() < 0.004
    assert abs(dropped_fraction(p) - p) <= 1 / 131072


def test_masks_differ_between_blocks_and_calls_but_repeat_for_the_same_seed():
    shape = torch.Size((2, 2, 16, 16))
    assert torch.equal(keep_mask(5, 1, shape, 0.5), keep_mask(5, 1, shape, 0.5))
    assert not torch.equal(keep_mask(5, 1, shape, 0.5), keep_mask(5, 2, shape, 0.5))
    q, k, v = _inputs()
    assert not torch.equal(causal_dropout_attention(q, k, v, 0.5), causal_dropout_attention(q, k, v, 0.5))


def test_it_serves_only_causal_cpu_training_with_dropout():
    q, k, v = _inputs()
    assert dropout_attention.fits(q, k, None, True, 0.1)
    assert not dropout_attention.fits(q, k, None, True, 0.0)
    assert not dropout_attention.fits(q, k, None, False, 0.1)
    assert not dropout_attention.fits(q, k, torch.ones(37, 37, dtype=torch.bool), True, 0.1)
    assert not dropout_attention.fits(q.double(), k.double(), None, True, 0.1)
    with torch.no_grad():
        assert not dropout_attention.fits(q, k, None, True, 0.1)


def _tiny(dropout):
    torch.manual_seed(0)
    return gpt.GPT(gpt.preset("gpt-tiny", dropout=dropout))


def _loss(model, idx):
    return F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())


def test_a_gpt_training_with_dropout_attends_here(monkeypatch):
    calls = []
    real = dropout_attention.causal_dropout_attention
    monkeypatch.setattr(dropout_attention, "causal_dropout_attention", lambda *a: calls.append(1) or real(*a))
    model = _tiny(0.1).train()
    idx = torch.randint(0, model.config.vocab_size, (2, 24))
    _loss(model, idx).backward()
    assert len(calls) == model.config.n_layer
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    calls.clear()
    model.eval()
    with torch.no_grad():
        model(idx)
    assert not calls


def test_activation_checkpointing_recomputes_the_same_masks():
    idx = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpoint in (False, True):
        model = _tiny(0.2).train()
        checkpointing.enable(model, checkpoint)
        torch.manual_seed(3)
        _loss(model, idx).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
