"""A model wrapper for decoding tests: it runs the real model (so caches behave) but dictates
every row's next token from a list: the i-th generated token is forced[i] (the last one from
then on), also at every position of a speculative step's wider forward."""

import torch


class ForcedModel(torch.nn.Module):
    def __init__(self, inner, forced: list[int]):
        super().__init__()
        self.inner, self.config, self.forced = inner, inner.config, forced
        self.base: torch.Tensor | None = None  # each cache row's length once its prompt is in

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def _logits(self, index: torch.Tensor) -> torch.Tensor:
        """Logits (..., V) that force forced[index] at each entry of `index`."""
        ids = torch.tensor(self.forced)[index.clamp(max=len(self.forced) - 1)]
        out = torch.full((*index.shape, self.config.vocab_size), -50.0)
        return out.scatter_(-1, ids[..., None], 50.0)

    def new_cache(self, *a, **k):
        return self.inner.new_cache(*a, **k)

    def start(self, prompts, cache, rows=None):
        self.inner.start(prompts, cache, rows=rows)
        rows_t, _ = cache.resolve_rows(rows, len(prompts))
        if self.base is None:
            self.base = torch.zeros(cache.batch_size, dtype=torch.long)
        self.base[rows_t] = cache.lengths[rows_t]
        return self._logits(torch.zeros(len(prompts), dtype=torch.long))

    def step(self, tokens, cache, rows=None, n_tokens=None, every=False):
        rows_t, _ = cache.resolve_rows(rows, tokens.shape[0])
        done = cache.lengths[rows_t] - self.base[rows_t]  # generated tokens already in the cache
        self.inner.step(tokens, cache, rows=rows, n_tokens=n_tokens)
        index = done[:, None] + 1 + torch.arange(tokens.shape[1])[None, :]
        if every:
            return self._logits(index)
        last = torch.full((len(index),), tokens.shape[1]) if n_tokens is None else torch.as_tensor(n_tokens)
        return self._logits(index[torch.arange(len(index)), last - 1])
