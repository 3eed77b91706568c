"""Chunked cross-entropy (gpt.chunked_loss) gives F.cross_entropy's loss and gradients without
the whole logits tensor: in training (training.loss) and in evaluation (gpt.evaluate)."""

import copy

import pytest
import torch
import torch.nn.functional as F

import gpt
from gpt import lora
from gpt.chunked_loss import head_cross_entropy, linear_cross_entropy, lm_cross_entropy, unwrap
from gpt.evaluate import collate_pairs
from training.loss import compute_loss

TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(n=37, c=16, v=53, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, c, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (0.3 * torch.randn(v, c, generator=g)).requires_grad_()
    b = (0.1 * torch.randn(v, generator=g)).requires_grad_() if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    t[::5] = -100  # ignored positions
    return h, w, b, t


def _grads(loss, *ts):
    return torch.autograd.grad(loss, [x for x in ts if x is not None])


@pytest.mark.parametrize("chunk_rows", [1, 7, 16, 37, 1000])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("bias", [True, False])
def test_same_loss_and_gradients_as_f_cross_entropy(chunk_rows, reduction, bias):
    h, w, b, t = _inputs(bias=bias)
    want = F.cross_entropy(F.linear(h, w, b), t, reduction=reduction)
    got = linear_cross_entropy(h, w, t, b, reduction=reduction, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, want, **TOL)
    for g, e in zip(_grads(got, h, w, b), _grads(want, h, w, b)):
        torch.testing.assert_close(g, e, **TOL)


def test_upstream_gradient_scales_and_frozen_weight_gets_none():
    h, w, b, t = _inputs()
    w.requires_grad_(False)
    want = 3.0 * F.cross_entropy(F.linear(h, w, b), t)
    got = 3.0 * linear_cross_entropy(h, w, t, b, chunk_rows=10)
    torch.testing.assert_close(got, want, **TOL)
    for g, e in zip(_grads(got, h, b), _grads(want, h, b)):
        torch.testing.assert_close(g, e, **TOL)


def test_every_target_ignored_is_nan_as_f_does():
    h, w, b, t = _inputs()
    t[:] = -100
    assert torch.isnan(linear_cross_entropy(h, w, t, b, chunk_rows=8))
    assert torch.isnan(F.cross_entropy(F.linear(h, w, b), t))


def test_autocast_bfloat16_matches_the_plain_path():
    h, w, b, t = _inputs(n=64, c=32, v=97)
    hb = h.to(torch.bfloat16)  # hidden states as autocast leaves them
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(hb, w, b), t)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a context of its own: autocast's cast cache
        got = linear_cross_entropy(hb, w, t, b, chunk_rows=9)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    for g, e in zip(_grads(got, h, w, b), _grads(want, h, w, b)):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-3)


def _tiny(tie=True, seed=0):
    torch.manual_seed(seed)
    cfg = gpt.preset("gpt-tiny")
    cfg.tie_embeddings = tie
    cfg.dropout = 0.0
    return gpt.GPT(cfg)


@pytest.mark.parametrize("tie", [True, False])
def test_full_backward_of_a_tiny_model_matches(tie):
    model = _tiny(tie)
    ref = copy.deepcopy(model)
    x = torch.randint(0, 257, (3, 21))
    y = torch.randint(0, 257, (3, 21))
    y[0, :4] = -100
    logits = ref(x)
    want = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    want.backward()
    got = head_cross_entropy(model.lm_head, model(x, hidden=True), y, chunk_rows=10)
    got.backward()
    torch.testing.assert_close(got, want, **TOL)
    if tie:
        assert model.lm_head.weight is model.transformer.wte.weight
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


def test_hidden_states_give_the_forwards_logits():
    model = _tiny().eval()
    x = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model(x, hidden=True)), model(x))


def test_lora_head_trains_its_adapters_through_the_merged_weight():
    model = _tiny(tie=False)
    lora.apply(model, rank=4, targets=("lm_head", "c_attn"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))  # B starts at zero: make the adapters matter
    ref = copy.deepcopy(model)
    x, y = torch.randint(0, 257, (2, 13)), torch.randint(0, 257, (2, 13))
    want = F.cross_entropy(ref(x).flatten(0, 1), y.flatten())
    want.backward()
    got = compute_loss(model, (x, y), "gpt")
    got.backward()
    torch.testing.assert_close(got, want, **TOL)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert any("lm_head.lora_B" in n for n, _ in trained)
    for (name, p), (_, q) in zip(trained, (x for x in ref.named_parameters() if x[1].requires_grad)):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


def test_training_loss_of_gpt_tiny_is_the_previous_formula():
    model = _tiny()
    x, y = torch.randint(0, 257, (4, 64)), torch.randint(0, 257, (4, 64))
    torch.manual_seed(1)
    got = compute_loss(model, (x, y), "gpt")
    torch.manual_seed(1)
    logits = model(x)
    want = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
    torch.testing.assert_close(got, want, **TOL)


def test_training_loss_of_the_encoder_decoder_is_the_previous_formula():
    torch.manual_seed(0)
    model = gpt.EncoderDecoder(gpt.preset("seq2seq-tiny")).eval()
    pairs = [([5, 6, 7], [8, 9]), ([10], [11, 12, 13, 14])]
    src, mask, tgt_in, tgt_out = collate_pairs(pairs, model.start_token, 256)
    got = compute_loss(model, (src, mask, tgt_in, tgt_out), "seq2seq")
    logits = model(src, tgt_in, mask)
    want = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=-100)
    torch.testing.assert_close(got, want, **TOL)
    got.backward()
    assert model.lm_head.weight.grad is not None


def test_evaluation_without_gradients_runs_the_head_a_slice_at_a_time():
    model = _tiny().eval()
    x, y = torch.randint(0, 257, (3, 30)), torch.randint(0, 257, (3, 30))
    y[1, 3:] = -100
    with torch.no_grad():
        want = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
        got = lm_cross_entropy(model, model(x, hidden=True), y, reduction="sum", chunk_rows=7)
    torch.testing.assert_close(got, want, **TOL)
    gpt.quantize(model, "int8")  # an int8 head has no weight to multiply by: the module runs
    with torch.no_grad():
        want = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
        got = lm_cross_entropy(model, model(x, hidden=True), y, reduction="sum", chunk_rows=7)
    torch.testing.assert_close(got, want, **TOL)


def test_the_head_is_found_inside_torch_compile_and_ddp_style_wrappers():
    model = _tiny()

    class DDP(torch.nn.Module):  # DistributedDataParallel keeps the model as .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    class Compiled(torch.nn.Module):  # torch.compile's OptimizedModule, as ._orig_mod
        def __init__(self, module):
            super().__init__()
            self._orig_mod = module

    assert unwrap(DDP(Compiled(model))) is model
    assert unwrap(model) is model
