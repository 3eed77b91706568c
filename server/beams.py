"""Beam search served beside the continuous batch.

A beam search keeps `num_beams` hypotheses in a KV cache of its own (`gpt.BeamSearch`), so it
never takes the batch's slots. The engine thread advances the oldest waiting search by one token
after each batch step: streams keep flowing while a search runs, and one search at a time bounds
the extra memory to num_beams cache rows. Its n best beams are the request's choices, each
delivered to its own handle as one piece when the search ends."""

from __future__ import annotations

import logging

from gpt import BeamSearch, Piece

from .requests import Request

log = logging.getLogger("gpt-serve.engine")


class BeamJob:
    """One prompt's beam search and the `requests` (one per choice) that receive its best beams."""

    def __init__(self, model, tokenizer, requests: list[Request]):
        self.model, self.tokenizer, self.requests = model, tokenizer, requests
        self.search: BeamSearch | None = None

    @property
    def started(self) -> bool:
        return self.search is not None

    def step(self, now: float) -> list[tuple[Request, Piece]] | None:
        """`advance`, except that a step that raises ends this search with "error" (like a
        failed batch step: the search fails, the server goes on)."""
        try:
            return self.advance(now)
        except Exception:
            log.exception("beam search step failed; failing its request")
            if self.search is not None:
                self.search.close()
            return [(r, Piece(finish_reason="error")) for r in self.requests]

    def advance(self, now: float) -> list[tuple[Request, Piece]] | None:
        """One step on the engine thread (the first reads the prompt). The outputs once the
        search has ended (finished, cancelled by every client, or past its deadline); else None."""
        first = self.requests[0]
        if all(r.cancelled for r in self.requests):
            return self.end("cancelled")
        if first.expired(now):
            return self.end("timeout")
        if self.search is None:
            self.search = BeamSearch(
                self.model, self.tokenizer, first.prompt, first.params, first.max_new_tokens
            )
        else:
            self.search.step()
        if not self.search.done:
            return None
        return self._hand_out(self.search.results(), "stop")

    def end(self, reason: str) -> list[tuple[Request, Piece]]:
        """Stop now: the best hypotheses so far (unfinished ones ending with `reason`)."""
        best = self.search.results(reason) if self.search is not None else []
        return self._hand_out(best, reason)

    def _hand_out(self, best: list[Piece], reason: str) -> list[tuple[Request, Piece]]:
        if self.search is not None:
            self.search.close()
        prompt_tokens = len(self.requests[0].prompt)
        out = []
        for i, r in enumerate(self.requests):
            # fewer distinct hypotheses than choices (a tiny vocabulary, a budget of one token):
            # the missing choices are empty
            piece = best[i] if i < len(best) else Piece(finish_reason=reason, prompt_tokens=prompt_tokens)
            out.append((r, piece))
        return out
