"""Multi-head attention: causal and bidirectional self-attention and cross-attention, one class,
on our one-query kernel for cached decode steps where it runs (gpt.kernels), on blocks of
queries for causal training with dropout on the CPU (gpt.dropout_attention), and on PyTorch's
scaled-dot-product attention elsewhere."""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import dropout_attention, kernels
from .config import ModelConfig
from .kv_cache import CacheView, LayerCache
from .linear import Linear
from .positions import apply_rotary

# With a KV cache every step attends to a key length it has not seen before, and cuDNN's attention
# (which PyTorch may pick on a GPU) builds a new plan for each new shape, which costs far more than
# the step itself (benchmarks/gpu.py measures it). Cached attention keeps to the others.
_CACHED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Forwards of up to this many new tokens per row attend token by token with our decode kernel
# (a speculative draft, a short prefill chunk); longer ones, prefills, go to PyTorch's.
TOKENWISE_MAX = 32


def native_attention_fits(dtype: torch.dtype, cache: LayerCache, training: bool) -> bool:
    """Whether a step of one query per row (activations of `dtype`) attends with our kernel
    (gpt.kernels): a float32 cache, or a float16 one where the CPU converts halves, on a CPU, for
    inference. The kernel writes the new keys and
    values itself, eagerly and inside torch.compile (the op declares its in-place writes, so
    inductor calls it on the cache itself); rows of up to 8192 positions (its scores live on
    the stack)."""
    k = cache.k
    return (
        k.device.type == "cpu"
        and dtype == torch.float32
        and k.shape[2] <= 8193
        and not torch.is_grad_enabled()
        and not training
        and kernels.attention_available()
        and (
            k.dtype == torch.float32
            or (
                k.dtype == torch.float16
                and k.shape[3] % 8 == 0
                and k.shape[3] <= 256
                and kernels.attention_f16_available()
            )
        )
    )


class Attention(nn.Module):
    """Multi-head scaled-dot-product attention.

    One class for causal self-attention, bidirectional self-attention and cross-attention.
    Self-attention projects Q, K and V with one fused matmul (GPT-2's `c_attn`); cross-attention
    projects Q from the decoder and a fused K/V from the encoder output.
    """

    def __init__(self, config: ModelConfig, cross: bool = False):
        super().__init__()
        C = config.n_embd
        self.n_head, self.head_dim, self.cross = config.n_head, config.head_dim, cross
        if cross:
            self.q_proj = Linear(C, C, bias=config.bias)
            self.kv_proj = Linear(C, 2 * C, bias=config.bias)
        else:
            self.c_attn = Linear(C, 3 * C, bias=config.bias)
        self.c_proj = Linear(C, C, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, t: Tensor) -> Tensor:  # (B, T, C) -> (B, H, T, D)
        B, T, _ = t.shape
        return t.view(B, T, self.n_head, self.head_dim).transpose(1, 2)

    def _native_attention_ok(self, q: Tensor, cache: LayerCache) -> bool:
        return native_attention_fits(q.dtype, cache, self.training)

    def _tokenwise(self, q: Tensor, k: Tensor, v: Tensor, cache: LayerCache, view: CacheView) -> Tensor:
        """A few new tokens per row (a short prefill chunk), each attended as the decode step of
        that one token attends it, by the same kernel, which writes every token's key and value
        before any token attends. Padding tokens attend from the spare position past the end;
        what they give is never used."""
        B, H, T, D = q.shape
        flat = lambda t: t.transpose(1, 2).reshape(B * T, H, D)  # noqa: E731 - (B, H, T, D) -> (B*T, H, D)
        y = torch.ops.gpt.attend_one(
            flat(q), flat(k), flat(v), cache.k, cache.v,
            view.rows.repeat_interleave(T), view.write_pos.reshape(B * T),
        )  # fmt: skip
        return y.view(B, T, H * D)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values (B, H, S, D) of the encoder output `memory` (B, S, C)."""
        return tuple(self._heads(t) for t in self.kv_proj(memory).split(memory.shape[-1], dim=2))

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
        cache: LayerCache | None = None,
        view: CacheView | None = None,
        memory: Tensor | None = None,
    ) -> Tensor:
        """x: (B, T, C). Self-attention unless `cross`, where keys/values come from `memory`
        (B, S, C) or, when decoding with a cache, from the cross K/V stored at prefill."""
        B, T, C = x.shape
        if self.cross:
            q = self._heads(self.q_proj(x))
            k, v = (
                self.project_kv(memory)
                if memory is not None
                else (t.to(q.dtype) for t in cache.read_cross(view))
            )
        else:
            q, k, v = (self._heads(t) for t in self.c_attn(x).split(C, dim=2))
            if rope is not None:
                q, k = apply_rotary(q, rope), apply_rotary(k, rope)
            if cache is not None and T == 1 and self._native_attention_ok(q, cache):
                H, D = self.n_head, self.head_dim
                y = torch.ops.gpt.attend_one(
                    q.reshape(B, H, D),
                    k.reshape(B, H, D),
                    v.reshape(B, H, D),
                    cache.k,
                    cache.v,
                    view.rows,
                    view.write_pos.view(B),
                )
                return self.resid_dropout(self.c_proj(y.view(B, 1, C)))
            if cache is not None and T <= TOKENWISE_MAX and self._native_attention_ok(q, cache):
                return self.resid_dropout(self.c_proj(self._tokenwise(q, k, v, cache, view)))
            if cache is not None:
                k, v = (t.to(q.dtype) for t in cache.update(view, k, v))  # a cache may store another dtype
        if self.training and dropout_attention.fits(q, k, mask, is_causal, self.dropout):
            y = dropout_attention.causal_dropout_attention(q, k, v, self.dropout)
            return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))
        with (
            sdpa_kernel(_CACHED_SDPA_BACKENDS)
            if cache is not None and q.is_cuda
            else contextlib.nullcontext()
        ):
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal and mask is None,
                dropout_p=self.dropout if self.training else 0.0,
            )
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.c_proj(y))
