"""Steps that must not be applied: a NaN or infinite loss or gradient norm. The trainer checks
both before every optimizer step, skips the update when either is not finite (so the weights
stay the last good ones), counts such steps, and stops after too many in a row."""

from __future__ import annotations

import torch


class TrainingDiverged(RuntimeError):
    """Too many steps in a row had a non-finite loss or gradient norm; gpt-train prints it as
    one line and exits with code 1."""


class BadSteps:
    """Steps whose loss or gradient norm is not finite. Their update is skipped, so the weights
    stay the last good ones; `limit` of them in a row mean the run is diverging, and it stops."""

    def __init__(self, limit: int, total: int = 0, in_a_row: int = 0):
        self.limit, self.total, self.in_a_row = limit, total, in_a_row

    def record(self, bad: bool) -> None:
        self.total += bad
        self.in_a_row = self.in_a_row + 1 if bad else 0

    @property
    def too_many(self) -> bool:
        return self.in_a_row >= self.limit


def grad_norm(model: torch.nn.Module, clip: float) -> torch.Tensor:
    """The gradients' total norm, after clipping them to `clip` when it is set."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))


def non_finite(loss: torch.Tensor, norm: torch.Tensor, scaled: bool) -> str | None:
    """What makes this step unfit to apply, or None. Under float16's grad scaler, overflowing
    gradients are routine while it calibrates its scale, and it skips those updates itself."""
    loss_bad, norm_bad = (~torch.isfinite(torch.stack([loss.float(), norm.float()]))).tolist()  # one sync
    if loss_bad:
        return "loss"
    return "gradient norm" if norm_bad and not scaled else None


def finite_weights(model: torch.nn.Module) -> bool:
    return bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all())
