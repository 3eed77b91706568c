"""The decoder-only GPT and the encoder-decoder Transformer, built from the shared layers.

Both models offer the same incremental interface, which generation and the server use:
  cache = model.new_cache(batch_size)
  logits = model.start(prompts, cache, rows=...)  # (B, V): next-token logits after each prompt
  logits = model.step(tokens, cache, rows=...)    # (B, V): after appending tokens to those rows
For a GPT a prompt is the start of the sequence; for the encoder-decoder it is the source, and
`start` also encodes it and feeds the decoder's start token (`config.decoder_start_token`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .config import ModelConfig
from .kv_cache import KVCache, Rows
from .layers import init_weights
from .linear import Linear
from .tokenizer import get_tokenizer
from .transformer import Transformer, pad


class GPT(Transformer):
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
        ids, lens = pad(prompts, self.device)
        cache.reset(rows if rows is not None else slice(0, len(prompts)))
        return self(ids, cache=cache, rows=rows, n_tokens=lens, last_only=True)

    def step(
        self, tokens: Tensor, cache: KVCache, rows: Rows | None = None, n_tokens=None, every: bool = False
    ) -> Tensor:
        """Append tokens (B, T) to the cache rows; next-token logits (B, V), or with `every` the
        logits at every position (B, T, V) (gpt.speculative verifies drafts with them)."""
        return self(tokens, cache=cache, rows=rows, n_tokens=n_tokens, last_only=not every)


class EncoderDecoder(Transformer):
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
        src, lens = pad(sources, self.device)
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


def build_model(config: ModelConfig) -> Transformer:
    """The model class that `config.arch` names."""
    return EncoderDecoder(config) if config.is_seq2seq else GPT(config)
