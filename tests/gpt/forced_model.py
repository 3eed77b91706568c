"""A model wrapper for decoding tests: it runs the real model (so caches behave) but dictates
every row's next token, one per forward, from a list."""

import torch


class ForcedModel(torch.nn.Module):
    def __init__(self, inner, forced: list[int]):
        super().__init__()
        self.inner, self.config, self.forced, self.i = inner, inner.config, forced, 0

    def _next(self, B: int) -> torch.Tensor:
        out = torch.full((B, self.config.vocab_size), -50.0)
        out[:, self.forced[min(self.i, len(self.forced) - 1)]] = 50.0
        self.i += 1
        return out

    def new_cache(self, *a, **k):
        return self.inner.new_cache(*a, **k)

    def start(self, prompts, cache, **k):
        self.inner.start(prompts, cache, **k)
        return self._next(len(prompts))

    def step(self, tokens, cache, **k):
        self.inner.step(tokens, cache, **k)
        return self._next(tokens.shape[0])
