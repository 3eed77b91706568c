"""What both models (gpt.model) share: running a stack of blocks with or without a KV cache,
as a prefill, a decode step (compiled where gpt.compile_decode made it so) or a speculative
draft's verification run as a decode step's rows, and building the caches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from . import step_rows
from .attention import native_attention_fits
from .config import ModelConfig
from .kv_cache import KVCache, Rows
from .layers import Block, final_layer_norm
from .positions import PositionEncoding

# Forwards over every position of up to this many new tokens per row run as a decode step's rows
# (`Transformer._run_as_rows`): a draft of up to 64 tokens (gpt-serve's limit) and the token
# before it. Wider ones (prompt chunks scored for their logprobs) keep PyTorch's attention.
AS_ROWS_MAX = 65


def pad(seqs: Sequence[Sequence[int]], device) -> tuple[Tensor, Tensor]:
    """Right-pad token lists into (B, T) and return their lengths (B,)."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one token")
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids.to(device), torch.tensor([len(s) for s in seqs])


class Transformer(nn.Module):
    """What both models share: running a stack of blocks (a decoder's, or the encoder's), with
    or without a cache, and building caches."""

    config: ModelConfig
    # A GPT's prompt can be fed to the cache a chunk at a time (the server interleaves long
    # prompts with decoding that way); the encoder is not causal, so a source is encoded whole.
    prefills_in_chunks: bool = True
    _compiled_stack = None  # set by gpt.compile_decode
    _decode_graphs = None  # set by gpt.cuda_graph_decode

    def _apply(self, fn, *args, **kwargs):
        if self._decode_graphs is not None:  # recorded graphs hold the old tensors' addresses
            self._decode_graphs.clear()
        if self._compiled_stack is not None:  # its unguarded graphs assume the parameters' dtype and device
            self._compiled_stack.reset()
        return super()._apply(fn, *args, **kwargs)

    def _embed(self, wte: nn.Embedding, wpe: PositionEncoding, idx: Tensor, pos: Tensor) -> Tensor:
        x = wte(idx)
        if self.config.scale_embeddings:
            x = x * math.sqrt(self.config.n_embd)
        add = wpe.additive(pos)
        return x if add is None else x + add

    def _check_ids(self, idx: Tensor, name: str) -> None:
        if idx.dim() != 2:
            raise ValueError(f"{name} must be (batch, time) token ids, got shape {tuple(idx.shape)}")
        if idx.shape[1] > self.config.block_size:
            raise ValueError(
                f"{name} has {idx.shape[1]} tokens, more than block_size {self.config.block_size}"
            )

    def _run(
        self,
        stack: nn.ModuleDict,
        wte: nn.Embedding,
        idx: Tensor,
        *,
        cache: KVCache | None,
        rows: Rows | None,
        n_tokens,
        causal: bool,
        mask: Tensor | None = None,
        memory: Tensor | None = None,
        memory_mask: Tensor | None = None,
        head: nn.Module | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """The stack's final hidden states (B, T, C); with `head`, its outputs (logits); with
        `last_only`, only at each row's last real token (B, ...)."""
        B, T = idx.shape
        graphs = self._decode_graphs
        if (
            graphs is not None
            and cache is not None
            and head is not None
            and memory is None
            and graphs.accepts(idx, cache, n_tokens, last_only)
        ):
            out = graphs.step(self, stack, wte, head, idx, cache, rows)  # gpt.cuda_graph_decode
            if out is not None:
                return out
        if (
            cache is not None
            and 1 < T <= AS_ROWS_MAX
            and not last_only
            and memory is None
            and not cache.max_src_len
            and native_attention_fits(wte.weight.dtype, cache.layers[0], stack.training)
        ):
            return self._run_as_rows(stack, wte, idx, cache, rows, n_tokens, head)
        view = None
        if cache is None:
            pos = torch.arange(T, device=idx.device)
        else:
            view, pos, mask, causal = cache.advance(B, T, rows, n_tokens)
            if T > 1:  # padding may run past the end
                pos = pos.clamp(max=self.config.block_size - 1)
            pos = pos.to(idx.device)
            if memory is None and cache.max_src_len:  # decoding against stored encoder outputs
                memory_mask = cache.cross_mask(view)
        # A decode step (one token per row, against the cache) may run compiled (gpt.compile_decode);
        # everything above, the cache's host-side bookkeeping, stays eager.
        # (lengths of 1 would need graphs of their own: a 1-token prompt, a 1-token source stay eager)
        # The output head runs inside that graph too: its activation quantization (int8) fuses there.
        step = cache is not None and T == 1 and view.kv_len > 1 and view.src_len != 1
        run = self._compiled_stack if step and self._compiled_stack else self._run_stack
        return run(
            stack,
            wte,
            idx,
            pos,
            mask=mask,
            causal=causal,
            cache=cache,
            view=view,
            memory=memory,
            memory_mask=memory_mask,
            head=head,
            last_only=last_only,
            n_tokens=None if T == 1 else n_tokens,
        )  # one token per row: it is the last

    def _run_as_rows(self, stack, wte, idx, cache: KVCache, rows, n_tokens, head) -> Tensor:
        """Every position's outputs (B, T, ...) of a forward over a few new tokens per row (a
        speculative draft being verified), run as one decode step whose rows are the tokens:
        each at its own position of its row of the cache (`KVCache.advance_as_rows`), through
        the step's own code and, where steps compile, its own graph. Our attention kernel writes
        every row's key before any row attends, so a token sees the ones before it; and as rows
        of a step never mix, each token gets the very numbers decoding it alone would: a kept
        draft changes no bit of the output. Padding tokens are not run; their outputs are 0."""
        B, T = idx.shape
        view, pos, real = cache.advance_as_rows(B, T, rows, n_tokens)
        real = real.to(idx.device)
        run = self._compiled_stack if self._compiled_stack and view.kv_len > 1 else self._run_stack
        # one sequence's tokens: every layer on the kernel one row runs on (gpt.step_rows)
        with step_rows.one_sequence() if B == 1 else contextlib.nullcontext():
            out = run(
                stack,
                wte,
                idx[real][:, None],
                pos.to(idx.device),
                mask=None,  # our attention kernel finds each row's keys from its position
                causal=False,
                cache=cache,
                view=view,
                memory=None,
                memory_mask=None,
                head=head,
                last_only=True,
            )
        full = out.new_zeros(B, T, *out.shape[1:])
        full[real] = out
        return full

    def _run_stack(
        self,
        stack: nn.ModuleDict,
        wte: nn.Embedding,
        idx: Tensor,
        pos: Tensor,
        *,
        mask: Tensor | None,
        causal: bool,
        cache: KVCache | None,
        view,
        memory: Tensor | None,
        memory_mask: Tensor | None,
        head: nn.Module | None = None,
        last_only: bool = False,
        n_tokens=None,
    ) -> Tensor:
        x = self._embed(wte, stack.wpe, idx, pos)
        x = stack.drop(x)
        rope = stack.wpe.rotary(pos)
        for i, block in enumerate(stack.h):
            x = block(
                x,
                mask=mask,
                is_causal=causal,
                rope=rope,
                cache=None if cache is None else cache.layers[i],
                view=view,
                memory=memory,
                memory_mask=memory_mask,
            )
        x = stack.ln_f(x)
        if last_only:
            x = self._last(x, n_tokens)
        return x if head is None else head(x)

    @staticmethod
    def _last(x: Tensor, n_tokens) -> Tensor:
        """The hidden state of each row's last real token: (B, T, C) -> (B, C)."""
        if n_tokens is None:
            return x[:, -1]
        idx = (torch.as_tensor(n_tokens).long() - 1).to(x.device)
        return x[torch.arange(x.shape[0], device=x.device), idx]

    def _stack(self, n_layer: int, cross: bool) -> nn.ModuleDict:
        c = self.config
        return nn.ModuleDict(
            dict(
                wpe=PositionEncoding(c),
                drop=nn.Dropout(c.dropout),
                h=nn.ModuleList(Block(c, cross_attention=cross) for _ in range(n_layer)),
                ln_f=final_layer_norm(c),
            )
        )

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        src_len: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache for `batch_size` rows of up to `max_len` tokens (default: block_size), and for
        an encoder-decoder, sources of up to `src_len` tokens (default: block_size). Keys and
        values are stored in `dtype` (default: the model's): float16 halves the cache's memory
        and what a batched decode step reads of it, and on a CPU with F16C our attention kernel
        reads it directly (elsewhere attention converts what it reads, which costs time)."""
        c = self.config
        max_len, src = max_len or c.block_size, (src_len or c.block_size) if c.is_seq2seq else 0
        if max_len > c.block_size or src > c.block_size:
            raise ValueError(
                f"a cache row holds at most block_size ({c.block_size}) tokens, asked for {max(max_len, src)}"
            )
        p = next(self.parameters())
        # Never inference tensors, even when made under inference_mode: one kind of cache for the
        # compiled decode step to guard on (gpt.compile_decode); in-place writes work in both modes.
        with torch.inference_mode(False):
            return KVCache(
                c.n_layer,
                batch_size,
                c.n_head,
                max_len,
                c.head_dim,
                src_len=src,
                dtype=dtype or p.dtype,
                device=p.device,
            )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
