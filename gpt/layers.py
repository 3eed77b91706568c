"""Transformer layers, written once and shared by the GPT and the encoder-decoder."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels
from .config import ModelConfig
from .kv_cache import CacheView, LayerCache
from .packing import is_current, stamp
from .quantization import Int8Linear


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


_ONEDNN_LINEAR = _onednn_linear_available()
# With a KV cache every step attends to a key length it has not seen before, and cuDNN's attention
# (which PyTorch may pick on a GPU) builds a new plan for each new shape: ~65 ms a call on an H100
# with torch 2.11 (benchmarks/gpu.py's server figures). Cached attention keeps to the others.
_CACHED_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_ONEDNN_MIN_WEIGHT = 1 << 19  # oneDNN costs ~15 us more per call: not worth it for small layers


class Linear(nn.Linear):
    """nn.Linear (same parameters, same state dict) that runs inference on oneDNN's GEMM.

    On CPU in fp32, F.linear goes to MKL's sgemm. Measured on the 2-core AMD EPYC (Zen 4) boxes
    this project benchmarks on, oneDNN's kernel is 1.5-2x faster for every decode shape (batch 1
    to 32, including the 50257-wide lm_head); MKL's single-row product did not use the second
    core at all. oneDNN's op has no backward, so training (grad enabled) keeps F.linear, and
    so does torch.compile, which picks its own kernels.

    `pack()` adds a copy of the weight in oneDNN's blocked layout. Given the plain layout,
    oneDNN reorders the weight on every call that has more than one row; with the packed copy
    a GPT-2-small forward of 4-512 rows ran 1.2-1.8x faster here. The copy costs the weight's
    memory again, so packing is opt-in (`pack_linear_weights(model)`; the server does it).

    A single row (the decode step of one stream) runs on our own matrix-vector kernel where it
    could be built (`gpt.kernels`), eagerly and under torch.compile, and on the plain weight with
    oneDNN elsewhere.
    """

    _packed: Tensor | None = None
    # (weight, its version, its storage) when packed: a changed weight drops the copy
    _packed_from: tuple = ()

    def _onednn_ok(self, x: Tensor) -> bool:
        return (
            _ONEDNN_LINEAR
            and self.weight.numel() >= _ONEDNN_MIN_WEIGHT
            and not torch.is_grad_enabled()
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and x.device.type == "cpu"
            and not torch.compiler.is_compiling()
        )

    def pack(self, rows_hint: int = 32) -> bool:
        """Make the blocked copy of the weight; False where this layer never runs on oneDNN."""
        w = self.weight
        if not (
            _ONEDNN_LINEAR
            and w.numel() >= _ONEDNN_MIN_WEIGHT
            and w.dtype == torch.float32
            and w.device.type == "cpu"
        ):
            return False
        with torch.no_grad():
            self._packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), rows_hint)
        self._packed_from = stamp(w)
        return True

    @property
    def is_packed(self) -> bool:
        """Whether the layer holds a packed copy of its weight. A copy whose weight has changed
        since is dropped by the next forward that would have used it (one of several rows)."""
        return self._packed is not None

    def _packed_weight(self, x: Tensor) -> Tensor | None:
        if self._packed is None or x.numel() == x.shape[-1]:  # unpacked, or a single row
            return None
        if not is_current(self._packed_from, self.weight):
            self._packed, self._packed_from = None, ()  # the weight changed since: never use a stale copy
            return None
        return self._packed

    def _native_ok(self, x: Tensor) -> bool:
        """A single row in float32 on a CPU, for inference: our matrix-vector kernel (gpt.kernels),
        eagerly and inside torch.compile alike."""
        w, b = self.weight, self.bias
        return (
            x.numel() == x.shape[-1]
            and w.numel() >= _ONEDNN_MIN_WEIGHT
            and not torch.is_grad_enabled()
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and x.device.type == "cpu"
            and w.is_contiguous()
            and (b is None or b.dtype == torch.float32)
            and kernels.f32_available()
        )

    def forward(self, x: Tensor) -> Tensor:
        if self._native_ok(x):
            y = torch.ops.gpt.gemv_f32(x.reshape(1, -1), self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if self._onednn_ok(x):
            w = self._packed_weight(x)
            return torch.ops.mkldnn._linear_pointwise(
                x, self.weight if w is None else w, self.bias, "none", [None], ""
            )
        return F.linear(x, self.weight, self.bias)


def pack_linear_weights(model: nn.Module, rows_hint: int = 32) -> int:
    """Give every eligible linear layer of `model` its oneDNN-blocked weight (`Linear.pack`, and
    `gpt.quantization.Int8Linear.pack` for int8 layers); returns how many were packed. For
    inference on CPU with batches of several rows."""
    return sum(m.pack(rows_hint) for m in model.modules() if isinstance(m, (Linear, Int8Linear)))


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
            if cache is not None:
                k, v = (t.to(q.dtype) for t in cache.update(view, k, v))  # a cache may store another dtype
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


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (GPT-2's tanh approximation) or ReLU (the original)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.d_ff, bias=config.bias)
        self.act = nn.GELU(approximate="tanh") if config.activation == "gelu" else nn.ReLU()
        self.c_proj = Linear(config.d_ff, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    """Self-attention, optional cross-attention, feed-forward; each with a residual and a
    LayerNorm placed before the sublayer (pre-LN, GPT-2) or after the residual (post-LN, original)."""

    def __init__(self, config: ModelConfig, cross_attention: bool = False):
        super().__init__()
        norm = lambda: nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)  # noqa: E731
        self.pre_ln = config.norm == "pre"
        self.ln_1, self.attn = norm(), Attention(config)
        self.ln_cross = norm() if cross_attention else None
        self.cross_attn = Attention(config, cross=True) if cross_attention else None
        self.ln_2, self.mlp = norm(), MLP(config)

    def _sublayer(self, x: Tensor, ln: nn.Module, fn) -> Tensor:
        return x + fn(ln(x)) if self.pre_ln else ln(x + fn(x))

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        is_causal: bool = False,
        rope=None,
        cache: LayerCache | None = None,
        view: CacheView | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
    ) -> Tensor:
        x = self._sublayer(
            x,
            self.ln_1,
            lambda h: self.attn(h, mask=mask, is_causal=is_causal, rope=rope, cache=cache, view=view),
        )
        if self.cross_attn is not None:
            x = self._sublayer(
                x,
                self.ln_cross,
                lambda h: self.cross_attn(h, mask=memory_mask, cache=cache, view=view, memory=memory),
            )
        return self._sublayer(x, self.ln_2, self.mlp)


# --- position encodings -------------------------------------------------------------------


def sinusoidal_table(n_pos: int, dim: int) -> Tensor:
    """The original Transformer's PE(pos, 2i) = sin(pos / 10000^(2i/d)), PE(pos, 2i+1) = cos(...)."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    inv = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.zeros(n_pos, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv[: dim // 2])
    return table.float()


def rotary_tables(n_pos: int, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables (n_pos, head_dim / 2) for rotary position embedding (RoPE)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.arange(n_pos, dtype=torch.float64)[:, None] * inv[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rotary(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate channel pairs (i, i + D/2) of x (B, H, T, D) by position-dependent angles.
    cos/sin are (B, 1, T, D/2), already gathered at each token's position."""
    cos, sin = rope
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class PositionEncoding(nn.Module):
    """Learned (GPT-2's `wpe`, kept as `weight` so the state dict matches GPT-2's layout),
    sinusoidal (added to the embeddings) or rotary (applied to queries and keys)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.pos_encoding
        if self.kind == "learned":
            self.weight = nn.Parameter(torch.zeros(config.block_size, config.n_embd))
        elif self.kind == "sinusoidal":
            self.register_buffer(
                "table", sinusoidal_table(config.block_size, config.n_embd), persistent=False
            )
        else:
            cos, sin = rotary_tables(config.block_size, config.head_dim, config.rope_base)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

    def additive(self, pos: Tensor) -> Tensor | None:
        """What to add to the token embeddings at positions `pos` (T,) or (B, T)."""
        if self.kind == "learned":
            return F.embedding(pos, self.weight)
        if self.kind == "sinusoidal":
            return self.table[pos]
        return None

    def rotary(self, pos: Tensor) -> tuple[Tensor, Tensor] | None:
        """cos/sin gathered at `pos`, shaped to broadcast over heads: (B or 1, 1, T, D/2)."""
        if self.kind != "rotary":
            return None
        if pos.dim() == 1:
            pos = pos[None]
        return self.cos[pos][:, None], self.sin[pos][:, None]
