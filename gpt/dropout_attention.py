"""Causal self-attention with dropout for training on the CPU, a block of queries at a time.

PyTorch's CPU attention has no fused kernel that takes dropout, so with dropout on,
`scaled_dot_product_attention` takes its math path: it keeps every layer's T x T probabilities,
its dropout mask and the dropped probabilities for the backward, and works over the whole square
although a causal query never sees the half above the diagonal. Here the forward keeps only the
output and each query's log-sum-exp; the backward computes each block's scores again, as flash
attention does, and draws the same dropout mask again from the seed the forward drew. A block of
queries works only on the keys it can see.

The result is the math path's, dropout mask aside: the mask comes from a generator of its own
per block, seeded from the default generator, so a seeded run is reproducible (and
torch.utils.checkpoint, which restores the default generator before it recomputes, recomputes
the same mask) but draws other masks than SDPA would.
"""

from __future__ import annotations

import torch
from torch import Tensor

BLOCK = 64  # queries at a time: the fastest of 32, 64 and 128 for GPT-2 small at batch 8 x 512


def fits(q: Tensor, k: Tensor, mask: Tensor | None, is_causal: bool, dropout: float) -> bool:
    """Whether this module attends: training-time causal self-attention with dropout, on the CPU,
    in float32 or bfloat16, outside torch.compile (which traces SDPA instead)."""
    return (
        dropout > 0.0
        and is_causal
        and mask is None
        and q.device.type == "cpu"
        and q.dtype in (torch.float32, torch.bfloat16)
        and q.shape[-2] == k.shape[-2]
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def causal_dropout_attention(q: Tensor, k: Tensor, v: Tensor, p: float, block: int = BLOCK) -> Tensor:
    """softmax(q k^T / sqrt(D) + causal) with dropout `p`, times v. q, k, v: (B, H, T, D). The
    result is (B, H, T, D) too, laid out as (B, T, H, D), so that the heads' outputs side by side,
    (B, T, H x D), are a view and not a copy (the output projection keeps its input)."""
    return _Attention.apply(q, k, v, p, block).transpose(1, 2)


def dropped_fraction(p: float) -> float:
    """The probability a mask drops with: `p` to the nearest 1/65536 (a mask compares 16 random
    bits with a threshold)."""
    return round(p * 65536) / 65536


def keep_mask(seed: int, index: int, shape: torch.Size, p: float) -> Tensor:
    """Block `index`'s dropout mask (True: kept), the same every time it is drawn. Each 64-bit
    draw of the generator gives three uniform 16-bit numbers (its top 16 bits hold only 15 random
    ones): a third of the draws, and a third of the time, of one float per element."""
    n = shape.numel()
    generator = torch.Generator().manual_seed(seed + index)
    words = torch.empty(-(-n // 3), dtype=torch.int64).random_(generator=generator)
    lanes = words.view(torch.int16).view(-1, 4)[:, :3]
    return (lanes >= round(p * 65536) - 32768).reshape(-1)[:n].view(shape)


def _scores(qb: Tensor, keys: Tensor, start: int, scale: float) -> Tensor:
    """A block's scaled scores against the keys up to its last query; the ones it must not see
    (above the diagonal, in its last block of keys) are -inf."""
    s = torch.matmul(qb, keys.transpose(-1, -2)).mul_(scale)
    n = qb.shape[-2]
    future = torch.ones(n, n, dtype=torch.bool, device=qb.device).triu_(1)
    s[..., start : start + n].masked_fill_(future, float("-inf"))
    return s


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, p: float, block: int) -> Tensor:
        B, H, T, D = q.shape
        scale, kept = D**-0.5, 1.0 / (1.0 - dropped_fraction(p))
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        out = q.new_empty(B, T, H, D)
        lse = q.new_empty(B, H, T, 1, dtype=torch.float32)
        for index, start in enumerate(range(0, T, block)):
            end = min(start + block, T)
            s = _scores(q[:, :, start:end], k[:, :, :end], start, scale).float()
            top = s.amax(-1, keepdim=True)
            s.sub_(top).exp_()
            total = s.sum(-1, keepdim=True)
            lse[:, :, start:end] = top + total.log()
            s.div_(total).masked_fill_(~keep_mask(seed, index, s.shape, p), 0.0).mul_(kept)
            out[:, start:end].transpose(1, 2).copy_(torch.matmul(s.to(v.dtype), v[:, :, :end]))
        ctx.save_for_backward(q, k, v, lse)
        ctx.seed, ctx.p, ctx.block = seed, p, block
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):
        q, k, v, lse = ctx.saved_tensors
        seed, p, block = ctx.seed, ctx.p, ctx.block
        T, D = q.shape[-2:]
        scale, kept = D**-0.5, 1.0 / (1.0 - dropped_fraction(p))
        dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
        for index, start in enumerate(range(0, T, block)):
            end = min(start + block, T)
            qb, keys, values = q[:, :, start:end], k[:, :, :end], v[:, :, :end]
            do = dout[:, start:end].transpose(1, 2)  # (B, H, block, D) of the (B, T, H, D) output
            probs = _scores(qb, keys, start, scale).float().sub_(lse[:, :, start:end]).exp_()
            drop = ~keep_mask(seed, index, probs.shape, p)
            dropped = probs.masked_fill(drop, 0.0).mul_(kept)
            dv[:, :, :end] += torch.matmul(dropped.transpose(-1, -2).to(do.dtype), do)
            dprobs = torch.matmul(do, values.transpose(-1, -2)).float().masked_fill_(drop, 0.0).mul_(kept)
            # softmax's backward: dS = P * (dP - sum(dP * P))
            dprobs.sub_((dprobs * probs).sum(-1, keepdim=True)).mul_(probs)
            ds = dprobs.to(q.dtype)
            dq[:, :, start:end] = torch.matmul(ds, keys).mul_(scale)
            dk[:, :, :end] += torch.matmul(ds.transpose(-1, -2), qb).mul_(scale)
        return dq, dk, dv, None, None
