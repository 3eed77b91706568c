"""The decoder-only GPT and the encoder-decoder Transformer, built from the shared layers.

Both models offer the same incremental interface, which generation and the server use:
  cache = model.new_cache(batch_size)
  logits = model.start(prompts, cache, rows=...)  # (B, V): next-token logits after each prompt
  logits = model.step(tokens, cache, rows=...)    # (B, V): after appending tokens to those rows
For a GPT a prompt is the start of the sequence; for the encoder-decoder it is the source, and
`start` also encodes it and feeds the decoder's start token (`config.decoder_start_token`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .config import ModelConfig
from .kv_cache import KVCache, Rows
from .layers import Block, final_layer_norm, init_weights
from .linear import Linear
from .positions import PositionEncoding
from .tokenizer import get_tokenizer


def _pad(seqs: Sequence[Sequence[int]], device) -> tuple[Tensor, Tensor]:
    """Right-pad token lists into (B, T) and return their lengths (B,)."""
    if not seqs or any(len(s) == 0 for s in seqs):
        raise ValueError("every sequence needs at least one token")
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids.to(device), torch.tensor([len(s) for s in seqs])


class _Transformer(nn.Module):
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
        # A decode step (one token per row, against the cache) may run compiled (gpt.compile_decode),
        # and so may one row's forward over a speculative draft (every position's logits);
        # everything above, the cache's host-side bookkeeping, stays eager.
        # (lengths of 1 would need graphs of their own: a 1-token prompt, a 1-token source stay eager)
        # The output head runs inside that graph too: its activation quantization (int8) fuses there.
        step = cache is not None and view.kv_len > 1 and view.src_len != 1
        step = step and (T == 1 or (B == 1 and not last_only and T <= 16 and memory is None))
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


class GPT(_Transformer):
    """Decoder-only, causal, GPT-2's parameter layout; `lm_head` shares the token embedding."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "gpt":
            raise ValueError(f"GPT needs arch='gpt', got {config.arch!r}")
        self.config = config
        self.transformer = self._stack(config.n_layer, cross=False)
        self.transformer.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        init_weights(self, config, config.n_layer)

    def forward(
        self,
        idx: Tensor,
        *,
        cache: KVCache | None = None,
        rows: Rows | None = None,
        n_tokens=None,
        last_only: bool = False,
        hidden: bool = False,
    ) -> Tensor:
        """Logits (B, T, vocab) for token ids (B, T); (B, vocab) for each row's last real token
        when `last_only`; with `hidden`, the final hidden states (gpt.chunked_loss). With a cache,
        the tokens go to `rows` of the cache (default the first B); row b brings `n_tokens[b]`."""
        self._check_ids(idx, "input_ids")
        return self._run(
            self.transformer,
            self.transformer.wte,
            idx,
            cache=cache,
            rows=rows,
            n_tokens=n_tokens,
            causal=True,
            head=None if hidden else self.lm_head,
            last_only=last_only,
        )

    def decode_parts(self) -> tuple[nn.ModuleDict, nn.Embedding, nn.Module]:
        """What a decode step runs: the block stack, the token embedding, the output head."""
        return self.transformer, self.transformer.wte, self.lm_head

    def start(self, prompts: Sequence[Sequence[int]], cache: KVCache, rows: Rows | None = None) -> Tensor:
        """Prefill the cache rows with prompts of any lengths; next-token logits (B, V)."""
        ids, lens = _pad(prompts, self.device)
        cache.reset(rows if rows is not None else slice(0, len(prompts)))
        return self(ids, cache=cache, rows=rows, n_tokens=lens, last_only=True)

    def step(
        self, tokens: Tensor, cache: KVCache, rows: Rows | None = None, n_tokens=None, every: bool = False
    ) -> Tensor:
        """Append tokens (B, T) to the cache rows; next-token logits (B, V), or with `every` the
        logits at every position (B, T, V) (gpt.speculative verifies drafts with them)."""
        return self(tokens, cache=cache, rows=rows, n_tokens=n_tokens, last_only=not every)


class EncoderDecoder(_Transformer):
    """The full Transformer: a non-causal encoder and a causal decoder with cross-attention.

    The decoder starts from `config.decoder_start_token` (unset: the tokenizer's end-of-text id)."""

    prefills_in_chunks = False

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not config.is_seq2seq:
            raise ValueError(f"EncoderDecoder needs arch='seq2seq', got {config.arch!r}")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # target (and shared source) embedding
        self.src_wte = None if config.share_embeddings else nn.Embedding(config.vocab_size, config.n_embd)
        self.encoder = self._stack(config.n_encoder_layer, cross=False)
        self.decoder = self._stack(config.n_layer, cross=True)
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        init_weights(self, config, config.n_layer + config.n_encoder_layer)
        start = config.decoder_start_token
        self.start_token = get_tokenizer(config.tokenizer).eot_token if start is None else start

    @staticmethod
    def _key_mask(src_mask: Tensor | None) -> Tensor | None:
        # (B, S) True = real token -> (B, 1, 1, S) for attention over the source.
        return None if src_mask is None else src_mask.bool()[:, None, None, :]

    def encode(self, src: Tensor, src_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, S, C). `src_mask` (B, S) marks real tokens (False = padding)."""
        self._check_ids(src, "src_ids")
        wte = self.src_wte or self.wte
        return self._run(
            self.encoder,
            wte,
            src,
            cache=None,
            rows=None,
            n_tokens=None,
            causal=False,
            mask=self._key_mask(src_mask),
        )

    def forward(
        self, src: Tensor, tgt: Tensor, src_mask: Tensor | None = None, hidden: bool = False
    ) -> Tensor:
        """Teacher-forced logits (B, T, vocab) for target inputs `tgt` given source `src`; with
        `hidden`, the decoder's final hidden states (B, T, C) (gpt.chunked_loss)."""
        self._check_ids(tgt, "tgt_ids")
        memory = self.encode(src, src_mask)
        return self._run(
            self.decoder,
            self.wte,
            tgt,
            cache=None,
            rows=None,
            n_tokens=None,
            causal=True,
            memory=memory,
            memory_mask=self._key_mask(src_mask),
            head=None if hidden else self.lm_head,
        )

    def start(self, sources: Sequence[Sequence[int]], cache: KVCache, rows: Rows | None = None) -> Tensor:
        """Encode the sources once, store every decoder layer's cross-attention K/V in the cache
        rows, and feed the start token; next-token logits (B, V)."""
        src, lens = _pad(sources, self.device)
        if src.shape[1] > cache.max_src_len:
            raise ValueError(f"source of {src.shape[1]} tokens exceeds the cache's {cache.max_src_len}")
        rows_t, _ = cache.resolve_rows(rows, len(sources))
        mask = torch.arange(src.shape[1])[None, :] < lens[:, None]
        memory = self.encode(src, mask.to(src.device))
        dev_rows = rows_t.to(cache.device)
        for block, layer in zip(self.decoder.h, cache.layers):
            layer.write_cross(dev_rows, *block.cross_attn.project_kv(memory))
        cache.reset(rows_t)
        cache.src_lengths[rows_t] = lens
        bos = torch.full((len(sources), 1), self.start_token, dtype=torch.long, device=self.device)
        return self.step(bos, cache, rows=rows)

    def step(
        self, tokens: Tensor, cache: KVCache, rows: Rows | None = None, n_tokens=None, every: bool = False
    ) -> Tensor:
        """Append target tokens (B, T) to the cache rows; next-token logits (B, V), or (B, T, V)."""
        self._check_ids(tokens, "tgt_ids")
        return self._run(
            self.decoder,
            self.wte,
            tokens,
            cache=cache,
            rows=rows,
            n_tokens=n_tokens,
            causal=True,
            head=self.lm_head,
            last_only=not every,
        )


def build_model(config: ModelConfig) -> _Transformer:
    """The model class that `config.arch` names."""
    return EncoderDecoder(config) if config.is_seq2seq else GPT(config)
