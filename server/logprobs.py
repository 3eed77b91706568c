"""Token logprobs in OpenAI's two formats: the legacy completions format (tokens, token_logprobs,
top_logprobs, text_offset) and the chat format (a content list with each token's bytes)."""
from __future__ import annotations

import math

from gpt import IncrementalDetokenizer, Piece

# JSON has no NaN or infinity. A logprob of -inf (a token the model rules out, reported as an
# alternative) or NaN (a model that overflowed) is sent as this floor instead, as vLLM does.
LOGPROB_FLOOR = -9999.0


def finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else LOGPROB_FLOOR


def token_text(tokenizer, token_id: int) -> str:
    """A token's own text; a token holding part of a UTF-8 character shows U+FFFD (its exact
    bytes are in the chat format's `bytes`)."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


class CompletionLogprobBuilder:
    """OpenAI's legacy format, built incrementally so streamed chunks agree with a whole response.
    text_offset is the character offset of each token in the decoded completion."""

    def __init__(self, tokenizer, top_n: int):
        self.tokenizer, self.top_n = tokenizer, top_n
        self.detok = IncrementalDetokenizer(tokenizer)

    def piece(self, piece: Piece) -> dict:
        tokens, offsets = [], []
        for t in piece.token_ids:
            offsets.append(len(self.detok.text))
            self.detok.push(t)
            tokens.append(token_text(self.tokenizer, t))
        top = None
        if self.top_n:
            top = [{token_text(self.tokenizer, t): finite(lp) for t, lp in alts.items()} for alts in piece.top_logprobs]
        return {"tokens": tokens, "token_logprobs": [finite(lp) for lp in piece.logprobs], "top_logprobs": top,
                "text_offset": offsets}


def chat_logprobs(tokenizer, piece: Piece, top_n: int) -> dict:
    def entry(t: int, lp: float) -> dict:
        b = tokenizer.token_bytes(t)
        return {"token": b.decode("utf-8", errors="replace"), "logprob": finite(lp), "bytes": list(b)}

    content = []
    for k, (t, lp) in enumerate(zip(piece.token_ids, piece.logprobs)):
        e = entry(t, lp)
        alts = piece.top_logprobs[k] if top_n and k < len(piece.top_logprobs) else {}
        e["top_logprobs"] = [entry(a, alp) for a, alp in list(alts.items())[:top_n]]
        content.append(e)
    return {"content": content}
