"""Our kernels, called as the gpt:: ops, against PyTorch and against their definitions in
gpt.kernels.reference: exact where the arithmetic is integer, within float32 rounding elsewhere,
on awkward shapes (a short last block of rows, a K tail, rows of their own lengths)."""

import pytest
import torch
import torch.nn.functional as F

import gpt.kernels as kernels
from gpt.kernels import reference

needs_kernels = pytest.mark.skipif(
    not kernels.f32_available(), reason=f"no native kernels here: {kernels.status()}"
)


SHAPES = [(1, 1, 1), (1, 7, 5), (1, 37, 200), (1, 64, 3072), (2, 9, 130), (5, 100, 64), (3, 4, 65)]
SHAPES += [(9, 37, 200), (17, 12, 256)]  # tiles of rows (4, or 2 on AVX2) and a rest


@needs_kernels
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_float32_kernel_matches_torch(M, N, K):
    x, w, b = torch.randn(M, K), torch.randn(N, K), torch.randn(N)
    torch.testing.assert_close(torch.ops.gpt.gemv_f32(x, w, b), F.linear(x, w, b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.ops.gpt.gemv_f32(x, w, None), F.linear(x, w), atol=1e-4, rtol=1e-4)


@needs_kernels
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_kernel_gives_the_exact_integer_products(M, N, K):
    x = torch.randint(-127, 128, (M, K), dtype=torch.int8)
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)  # -128 too: no weight value is off limits
    shifted = (x.int() + 128).to(torch.uint8)
    y = torch.ops.gpt.gemv_u8s8(shifted, kernels.interleave_int8(w), w.sum(1, dtype=torch.int32))
    assert y.dtype == torch.int32 and torch.equal(y.long(), x.long() @ w.long().t())


@needs_kernels
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_the_whole_int8_layer_in_one_call_gives_torchs_numbers_to_the_bit(M, N, K):
    """linear_u8s8 quantizes each row, multiplies and rescales in C: the same float operations
    as gpt.quantization's tensor code, so the same numbers, a zero row and no bias included."""
    x = torch.randn(M, K) * torch.logspace(-3, 3, M)[:, None]
    x[-1, : K // 2] = 0.0
    if M > 1:
        x[0] = 0.0
    w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    scale, bias = torch.rand(N) * 0.01, torch.randn(N)
    rows, sums = kernels.interleave_int8(w), w.sum(1, dtype=torch.int32)
    for b in (bias, None):
        y = torch.ops.gpt.linear_u8s8(x, rows, sums, scale, b)
        assert torch.equal(y, reference.linear_u8s8_reference(x, w, scale, b))
        assert torch.equal(
            torch.ops.gpt.linear_u8s8(x[-1:], rows, sums, scale, b), y[-1:]
        )  # alone as in a batch


@needs_kernels
@pytest.mark.parametrize("B,V", [(1, 1), (1, 7), (3, 300), (32, 50257)])
def test_argmax_and_logsumexp_over_rows_match_torch(B, V):
    x = torch.randn(B, V) * 8
    x[0, V // 2 :] = x[0].max()  # ties: the first largest wins
    if B > 2:
        x[1] = -float("inf")  # a fully masked row, then one with a single live token
        x[2, :] = -float("inf")
        x[2, V - 1] = 3.0
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    torch.testing.assert_close(kernels.logsumexp(x), torch.logsumexp(x, -1), atol=2e-6, rtol=1e-6)
    assert torch.equal(kernels.argmax(x.double()), x.double().argmax(-1))  # other dtypes: PyTorch's


@needs_kernels
def test_a_nan_in_a_row_is_found_as_torch_finds_it():
    x = torch.randn(2, 1000)
    x[1, 17] = x[1, 400] = float("nan")
    assert torch.equal(kernels.argmax(x), x.argmax(-1))
    assert torch.isnan(kernels.logsumexp(x)[1]) and torch.isfinite(kernels.logsumexp(x)[0])


@needs_kernels
def test_logsumexp_of_many_equal_logits_keeps_its_precision():
    """Float32 running sums of equal small terms drift (4e-5 here before the blocked sum)."""
    x = torch.full((1, 50257), -8.5)
    x[0, 0] = 0.0
    want = torch.logsumexp(x.double(), -1).float()
    torch.testing.assert_close(kernels.logsumexp(x), want, atol=1e-6, rtol=0)


@needs_kernels
def test_the_kernels_weight_layout_is_a_reordering_that_the_kernel_depends_on():
    w = torch.randint(
        -128, 128, (10, 200), dtype=torch.int8
    )  # two blocks of four rows, two plain rows, a K tail
    rows = kernels.interleave_int8(w)
    assert rows.shape == w.shape and torch.equal(rows.view(-1).sort().values, w.view(-1).sort().values)
    assert torch.equal(rows[8:], w[8:]) and not torch.equal(rows[:8], w[:8])
    x = torch.randint(0, 256, (1, 200), dtype=torch.uint8)
    want = (x.long() - 128) @ w.long().t()
    sums = w.sum(1, dtype=torch.int32)
    assert torch.equal(torch.ops.gpt.gemv_u8s8(x, rows, sums).long(), want)
    assert not torch.equal(torch.ops.gpt.gemv_u8s8(x, w, sums)[:, :8].long(), want[:, :8])


@needs_kernels
@pytest.mark.parametrize("B,H,D,L", [(1, 1, 1, 1), (3, 2, 8, 12), (4, 12, 64, 130), (2, 3, 80, 1030)])
def test_attention_kernel_writes_the_new_keys_and_attends_like_torch(B, H, D, L):
    g = torch.Generator().manual_seed(B * 1000 + L)
    kc, vc = torch.randn(2, B + 2, H, L + 1, D, generator=g).unbind(0)
    q, k, v = torch.randn(3, B, H, D, generator=g).unbind(0)
    rows = torch.randperm(B + 2, generator=g)[:B]  # any rows, in any order
    pos = torch.randint(0, L, (B,), generator=g)  # each row its own length
    want_k, want_v = kc.clone(), vc.clone()
    want = reference.attend_reference(q, k, v, want_k, want_v, rows, pos)
    got = torch.ops.gpt.attend_one(q, k, v, kc, vc, rows, pos)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)


needs_f16_attention = pytest.mark.skipif(
    not kernels.attention_f16_available(), reason=f"no float16-cache attention kernel: {kernels.status()}"
)


@needs_f16_attention
@pytest.mark.parametrize("B,H,D,L", [(1, 1, 8, 1), (3, 2, 16, 12), (4, 12, 64, 130), (2, 3, 80, 1030)])
def test_float16_cache_attention_kernel_rounds_the_new_keys_and_attends_like_torch(B, H, D, L):
    g = torch.Generator().manual_seed(B * 1000 + L)
    kc, vc = (c.half() for c in torch.randn(2, B + 2, H, L + 1, D, generator=g).unbind(0))
    q, k, v = torch.randn(3, B, H, D, generator=g).unbind(0)
    rows = torch.randperm(B + 2, generator=g)[:B]
    pos = torch.randint(0, L, (B,), generator=g)
    want_k, want_v = kc.clone(), vc.clone()
    want = reference.attend_reference(q, k, v, want_k, want_v, rows, pos)  # float32 arithmetic on the halves
    got = torch.ops.gpt.attend_one(q, k, v, kc, vc, rows, pos)
    torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # round to nearest, like torch's .half()
