"""Start-up checks of what this machine does fast.

A 16-bit model on a CPU without native 16-bit arithmetic converts inside every kernel: at one
row it still wins (half the bytes to read), but a batched forward can run several times slower
than in fp32. Rather than let an operator find out under load, the server times one
feed-forward-sized matmul at its batch size in both dtypes when it starts, and warns.
"""

from __future__ import annotations

import time

import torch


def _matmul_seconds(rows: int, width: int, dtype: torch.dtype, repeats: int = 5) -> float:
    x = torch.randn(rows, width).to(dtype)
    w = torch.randn(4 * width, width).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        torch.nn.functional.linear(x, w)  # first call: kernel selection, allocation
        for _ in range(repeats):
            t = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t)
    return best


def batched_slowdown(dtype: torch.dtype, rows: int, width: int) -> float:
    """How many times slower a (rows x width) @ (width x 4 width) product runs on this CPU in
    `dtype` than in fp32 (< 1: faster)."""
    if dtype == torch.float32:
        return 1.0
    return _matmul_seconds(rows, width, dtype) / _matmul_seconds(rows, width, torch.float32)
