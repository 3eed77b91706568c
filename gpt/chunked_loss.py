"""Cross-entropy of a language model's output head without its whole logits tensor.

A batch of 8 x 512 tokens over GPT-2's 50,257 ids has 8 x 512 x 50,257 logits: 823 MB in float32,
and their gradient as much again. Here the head and the loss run a slice of rows at a time
(`chunk_rows` rows, by default about 16M logits' worth): the forward keeps only each row's
log-sum-exp, and the backward computes each slice's logits again, turns them into
softmax - one-hot and adds that slice's share to the gradients of the hidden states and of
the head's weight (and bias). Peak memory then grows with the slice, not with
batch x length x vocabulary. The same idea as Liger-Kernel's and torchtune's fused
linear cross-entropy.

    hidden = model(x, hidden=True)                     # (B, T, C), after the final layer norm
    loss = lm_cross_entropy(model, hidden, targets)    # = F.cross_entropy(model(x) flattened, ...)

Targets equal to `ignore_index` add nothing, and "mean" divides by the other targets' count,
as F.cross_entropy does. Under autocast the head's product runs in autocast's dtype, as F.linear
would there, and the log-sum-exp and softmax in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -100
# logits per slice: 2**24 float32 logits are 64 MB; with GPT-2's vocabulary, 333 rows a slice
CHUNK_LOGITS = 1 << 24


def default_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_LOGITS // max(1, vocab))


def _compute_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype of the head's product: autocast's where it is on (as F.linear would run),
    else the inputs' common dtype."""
    dev = h.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(h.dtype, weight.dtype)


def _logits(h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """One slice's logits in float32, from the product in the dtype of `w` (h is cast to it)."""
    out = h.to(w.dtype) @ w.t()
    if b is not None:
        out = out + b
    return out.float()


def _dlogits(logits: Tensor, lse: Tensor, t: Tensor, keep: Tensor) -> Tensor:
    """d loss / d logits of one slice, in place of its float32 logits: softmax - one-hot, zero
    on the ignored rows."""
    g = logits.sub_(lse[:, None]).exp_()
    g.scatter_add_(1, torch.where(keep, t, 0).unsqueeze(1), -keep.float().unsqueeze(1))
    return g.mul_(keep.float().unsqueeze(1))


class _LinearCrossEntropy(torch.autograd.Function):
    """sum of -log softmax(h W^T + b)[target] over the rows whose target is not ignored."""

    @staticmethod
    def forward(ctx, h, weight, bias, targets, ignore_index: int, chunk_rows: int):
        dt = _compute_dtype(h, weight)
        with torch.autocast(h.device.type, enabled=False):
            w, b = weight.to(dt), None if bias is None else bias.to(dt)
            n = h.shape[0]
            lse = torch.empty(n, device=h.device, dtype=torch.float32)
            total = torch.zeros((), device=h.device, dtype=torch.float32)
            ctx.dlogits = None
            for lo in range(0, n, chunk_rows):
                hi = min(n, lo + chunk_rows)
                logits = _logits(h[lo:hi], w, b)
                lse[lo:hi] = torch.logsumexp(logits, dim=-1)
                t = targets[lo:hi]
                keep = t != ignore_index
                picked = logits.gather(1, torch.where(keep, t, 0).unsqueeze(1)).squeeze(1)
                total += torch.where(keep, lse[lo:hi] - picked, 0.0).sum()
                if hi - lo == n and any(ctx.needs_input_grad[:3]):
                    # one slice holds every row: keep its gradient rather than compute its
                    # logits again in the backward (no more memory than the slice itself)
                    ctx.dlogits = _dlogits(logits, lse, t, keep)
                del logits
        ctx.save_for_backward(h, weight, bias, targets, lse)
        ctx.dt, ctx.ignore_index, ctx.chunk_rows = dt, ignore_index, chunk_rows
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_b else None
        if not (need_h or need_w or need_b):
            return None, None, None, None, None, None
        dt, n = ctx.dt, h.shape[0]
        with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
            w, b = weight.to(dt), None if bias is None else bias.to(dt)
            for lo in range(0, n, ctx.chunk_rows):
                hi = min(n, lo + ctx.chunk_rows)
                hc = h[lo:hi].to(dt)
                t = targets[lo:hi]
                keep = t != ctx.ignore_index
                g = ctx.dlogits
                if g is None:
                    g = _dlogits(_logits(hc, w, b), lse[lo:hi], t, keep)
                g.mul_(grad_total.float())
                if grad_b is not None:
                    grad_b += g.sum(0)
                g = g.to(dt)
                if grad_h is not None:
                    grad_h[lo:hi] = g @ w
                if grad_w is not None:
                    grad_w += (g.t() @ hc).float()
                del g
        ctx.dlogits = None
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """F.cross_entropy(F.linear(h, weight, bias) flattened to rows, targets flattened), computed
    `chunk_rows` rows at a time. h is (..., C), weight (V, C), targets of h's leading shape."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    h2, t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if h2.shape[0] != t.shape[0]:
        raise ValueError(f"{h2.shape[0]} rows of hidden states but {t.shape[0]} targets")
    rows = chunk_rows or default_chunk_rows(weight.shape[0])
    total = _LinearCrossEntropy.apply(h2, weight, bias, t, ignore_index, rows)
    if reduction == "sum":
        return total
    return total / (t != ignore_index).sum()  # 0 / 0 = nan when every target is ignored, as F does


def head_weight(head: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) such that head(x) = x @ weight^T + bias, differentiable: a linear layer's
    own, a LoRA layer's merged weight (while its dropout is off); None for any other head
    (int8, for inference, or a LoRA head training with dropout)."""
    from .lora import LoRALinear

    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    if isinstance(head, LoRALinear) and isinstance(head.base, nn.Linear):
        if head.training and not isinstance(head.dropout, nn.Identity):
            return None
        return head.merged_weight(), head.base.bias
    return None


def head_cross_entropy(
    head: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """F.cross_entropy(head(hidden) flattened, targets flattened) without every row's logits at
    once. With gradients: `linear_cross_entropy` on the head's weight. Without (evaluation):
    the head module itself on a slice of rows at a time, so any head (int8 too) and its kernels
    give the logits. A head with no weight to use under gradients runs whole, as before."""
    h2, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled():
        wb = head_weight(head)
        if wb is not None:
            return linear_cross_entropy(
                h2, wb[0], t, wb[1], ignore_index=ignore_index, reduction=reduction, chunk_rows=chunk_rows
            )
        return F.cross_entropy(head(h2).float(), t, ignore_index=ignore_index, reduction=reduction)
    rows = chunk_rows or default_chunk_rows(_out_features(head))
    total = torch.zeros((), device=hidden.device, dtype=torch.float32)
    for lo in range(0, h2.shape[0], rows):
        logits = head(h2[lo : lo + rows]).float()
        total += F.cross_entropy(logits, t[lo : lo + rows], ignore_index=ignore_index, reduction="sum")
    return total if reduction == "sum" else total / (t != ignore_index).sum()


def _out_features(head: nn.Module) -> int:
    n = getattr(head, "out_features", None)
    if n is None:
        n = getattr(getattr(head, "base", None), "out_features", None)
    return n or 1 << 16


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def lm_cross_entropy(
    model: nn.Module,
    hidden: Tensor,
    targets: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    chunk_rows: int | None = None,
) -> Tensor:
    """The loss of `model`'s output head (GPT or encoder-decoder, possibly wrapped in DDP or
    torch.compile) on `hidden`, what model(..., hidden=True) returned."""
    return head_cross_entropy(
        unwrap(model).lm_head,
        hidden,
        targets,
        ignore_index=ignore_index,
        reduction=reduction,
        chunk_rows=chunk_rows,
    )
