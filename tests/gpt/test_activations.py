"""GPT-2's GELU on our kernel is PyTorch's tanh GELU within float32 rounding, forward and
backward, and everything our kernel does not take stays on PyTorch's exactly."""

import pytest
import torch
import torch.nn.functional as F

import gpt
import gpt.kernels as kernels
from gpt.activations import KERNEL_FROM, gelu_tanh

needs_kernels = pytest.mark.skipif(not kernels.gelu_available(), reason=f"no kernels: {kernels.status()}")


def _values(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 1.5, n)  # tiny to far into both tails
    x[:4] = torch.tensor([0.0, -0.0, 40.0, -40.0])
    return x


@needs_kernels
def test_the_kernel_gives_torchs_tanh_gelu_and_its_gradient_within_rounding():
    x = _values(4 * KERNEL_FROM + 13).requires_grad_()  # a tail the vector loop leaves over
    ref = x.detach().clone().requires_grad_()
    grad = torch.randn(x.shape)
    y = gelu_tanh(x)
    assert "GeluBackward" not in type(y.grad_fn).__name__  # the kernel ran, not the fallback
    y.backward(grad)
    want = F.gelu(ref, approximate="tanh")
    want.backward(grad)
    torch.testing.assert_close(y.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(gelu_tanh(x), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "x",
    [
        _values(KERNEL_FROM - 1),  # a decode step's few rows
        _values(2 * KERNEL_FROM).bfloat16(),
        _values(2 * KERNEL_FROM).double(),
        _values(2 * KERNEL_FROM)[::2],  # strided: made contiguous by the kernel, exact either way
    ],
    ids=["small", "bfloat16", "float64", "strided"],
)
def test_what_the_kernel_does_not_take_is_torchs_gelu(x):
    got, want = gelu_tanh(x), F.gelu(x, approximate="tanh")
    if x.numel() < KERNEL_FROM or x.dtype != torch.float32 or not kernels.gelu_available():
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_without_our_kernels_a_model_trains_on_torchs_gelu_with_the_same_gradients(monkeypatch):
    torch.manual_seed(0)
    model = gpt.build_model(gpt.ModelConfig(vocab_size=64, block_size=64, n_layer=2, n_head=2, n_embd=64))
    x = torch.randint(0, 64, (8, 64))

    def grads():
        model.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
        return [p.grad.clone() for p in model.parameters()]

    ours = grads()
    monkeypatch.setattr(kernels, "_isa", lambda: 0)
    for a, b in zip(ours, grads()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_kernels
def test_at_inference_a_rows_gelu_does_not_depend_on_how_many_rows_run_with_it():
    # a speculative draft's tokens run as rows of a decode step, and must get the step's numbers
    x = _values(4 * KERNEL_FROM).view(-1, 1024)
    with torch.inference_mode():
        together = gelu_tanh(x)
        assert all(torch.equal(gelu_tanh(x[i : i + 1]), together[i : i + 1]) for i in range(0, len(x), 7))
