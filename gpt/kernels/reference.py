"""What our C kernels compute, written in PyTorch: the definitions they are checked against.

`quantize_rows` is also what the int8 layers (gpt.quantization) run wherever the kernel that
quantizes inside `linear_u8s8` does not: one definition of the activations' quantization, which
keeps a row's result the same whichever path computed it. `self_check` runs each kernel once
against these definitions before any call is routed to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def quantize_rows(x: Tensor, dtype: torch.dtype = torch.int8) -> tuple[Tensor, Tensor]:
    """Symmetric int8 quantization with one scale per row: x (M, K) ~ scale (M, 1) * q. With
    dtype=torch.uint8, q comes shifted by 128 (a zero point of 128), for kernels that want it.
    The activations of every int8 layer at each call, and the weights once, per output channel."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12).div_(127.0)
    # |x / scale| <= 127 by construction (the row's largest entry maps to +-127), so no clamp;
    # few ops, since an eager decode step runs this once for every int8 layer
    q = x.div(scale).round_()
    return (q.add_(128) if dtype == torch.uint8 else q).to(dtype), scale


def linear_u8s8_reference(x: Tensor, w: Tensor, w_scale: Tensor, bias: Tensor | None) -> Tensor:
    """What `linear_u8s8` computes, with w in the plain layout: x quantized per row
    (`quantize_rows`), the exact integer products, rescaled as gpt.quantization.Int8Linear does."""
    q, s = quantize_rows(x)
    y = (q.long() @ w.long().t()).float().mul_(s)
    return y.mul_(w_scale) if bias is None else torch.addcmul(bias, y, w_scale)


def attend_reference(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Tensor, pos: Tensor
) -> Tensor:
    """What `attend_one` computes: write each row's k, v (B, H, D) at pos[b] of cache row
    rows[b], then attend with q (B, H, D) to that row's positions 0..pos[b]."""
    k_cache[rows, :, pos] = k.to(k_cache.dtype)
    v_cache[rows, :, pos] = v.to(v_cache.dtype)
    n = int(pos.max()) + 1
    mask = (torch.arange(n)[None, :] <= pos[:, None])[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None], k_cache[rows, :, :n].to(q.dtype), v_cache[rows, :, :n].to(q.dtype), attn_mask=mask
    )[:, :, 0]


def self_check(
    isa: int,
    has_f16: bool,
    interleave: Callable[[Tensor], Tensor],
    gemv_f32,
    gemv_u8s8,
    linear_u8s8,
    attend,
    argmax_rows,
    logsumexp_rows,
    gelu_tanh,
    gelu_tanh_backward,
) -> None:
    """A library's kernels, reached through the given callables (its ctypes wrappers, or the
    registered torch ops), against the definitions above and PyTorch on awkward shapes: a short
    last block, a K tail; rows out of order in a strided cache, each of its own length. `isa` is
    the library's `gemv_isa()`, `has_f16` whether it has the float16-cache attention kernel and
    `interleave` its int8 weight layout. Raises RuntimeError at the first disagreement."""
    g = torch.Generator().manual_seed(0)
    kc, vc = torch.randn(2, 5, 3, 12, 8, generator=g).unbind(0)  # (rows, heads, positions, D)
    q, k, v = torch.randn(3, 2, 3, 8, generator=g).unbind(0)
    rows, pos = torch.tensor([3, 1]), torch.tensor([0, 6])
    want = attend_reference(q, k, v, kc.clone(), vc.clone(), rows, pos)
    if not torch.allclose(attend(q, k, v, kc, vc, rows, pos), want, atol=1e-5, rtol=1e-5):
        raise RuntimeError("attention kernel disagrees with torch")
    if has_f16:
        kc, vc = (c.half() for c in torch.randn(2, 5, 3, 12, 16, generator=g).unbind(0))
        q, k, v = torch.randn(3, 2, 3, 16, generator=g).unbind(0)
        want = attend_reference(q, k, v, kc.clone(), vc.clone(), rows, pos)
        got = attend(q, k, v, kc, vc, rows, pos)
        if not torch.allclose(got, want, atol=1e-4, rtol=1e-4) or not torch.equal(kc[rows, :, pos], k.half()):
            raise RuntimeError("float16-cache attention kernel disagrees with torch")
    logits = torch.randn(4, 1001, generator=g) * 10
    logits[1, 5:] = logits[1, 3]  # ties: the first one wins
    logits[2, :] = -float("inf")
    logits[2, 7] = 1.0
    logits[3, 9] = float("nan")
    if not torch.equal(argmax_rows(logits), logits.argmax(-1)):
        raise RuntimeError("argmax kernel disagrees with torch")
    if not torch.allclose(
        logsumexp_rows(logits), torch.logsumexp(logits, -1), rtol=1e-6, atol=1e-6, equal_nan=True
    ):
        raise RuntimeError("logsumexp kernel disagrees with torch")
    x = torch.cat([torch.randn(1000, generator=g) * 4, torch.tensor([0.0, -0.0, 30.0, -30.0, 1e-30])])
    with torch.enable_grad():  # (the caller makes sure it is not under inference_mode)
        x.requires_grad_()
        want = torch.nn.functional.gelu(x, approximate="tanh")
        grad = torch.randn(x.shape, generator=g)
        (want_dx,) = torch.autograd.grad(want, x, grad)
    x = x.detach()
    if not torch.allclose(gelu_tanh(x), want.detach(), rtol=1e-5, atol=1e-6):
        raise RuntimeError("GELU kernel disagrees with torch")
    if not torch.allclose(gelu_tanh_backward(grad, x), want_dx, rtol=1e-5, atol=1e-5):
        raise RuntimeError("GELU backward kernel disagrees with torch")
    for M, N, K in [(1, 7, 5), (1, 37, 200), (3, 9, 130), (6, 9, 130)]:  # 6: a tile of rows and a rest
        if isa & 1:
            x, w, b = (
                torch.randn(M, K, generator=g),
                torch.randn(N, K, generator=g),
                torch.randn(N, generator=g),
            )
            if not torch.allclose(
                gemv_f32(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-4, rtol=1e-4
            ):
                raise RuntimeError("float32 kernel disagrees with torch")
        if isa >> 4:
            xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
            w8 = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
            y8 = gemv_u8s8((xq.int() + 128).to(torch.uint8), interleave(w8), w8.sum(1, dtype=torch.int32))
            if not torch.equal(y8.long(), xq.long() @ w8.long().t()):
                raise RuntimeError("int8 kernel disagrees with torch")
            x, ws, b = torch.randn(M, K, generator=g), torch.rand(N, generator=g), torch.randn(N, generator=g)
            if not torch.equal(
                linear_u8s8(x, interleave(w8), w8.sum(1, dtype=torch.int32), ws, b),
                linear_u8s8_reference(x, w8, ws, b),
            ):
                raise RuntimeError("int8 linear kernel disagrees with torch")
