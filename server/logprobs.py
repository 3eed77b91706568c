"""Token logprobs in OpenAI's two formats: the legacy completions format (tokens, token_logprobs,
top_logprobs, text_offset) and the chat format (a content list with each token's bytes)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gpt import IncrementalDetokenizer, Piece
from gpt.decoding import PromptLogprobs

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
    text_offset is the character offset of each token in the choice's text: in the decoded
    completion, after `offset` characters (an echoed prompt's)."""

    def __init__(self, tokenizer, top_n: int, offset: int = 0):
        self.tokenizer, self.top_n, self.offset = tokenizer, top_n, offset
        self.detok = IncrementalDetokenizer(tokenizer)

    def piece(self, piece: Piece) -> dict:
        tokens, offsets = [], []
        for t in piece.token_ids:
            offsets.append(self.offset + len(self.detok.text))
            self.detok.push(t)
            tokens.append(token_text(self.tokenizer, t))
        top = None
        if self.top_n:
            top = [
                {token_text(self.tokenizer, t): finite(lp) for t, lp in alts.items()}
                for alts in piece.top_logprobs
            ]
        return {
            "tokens": tokens,
            "token_logprobs": [finite(lp) for lp in piece.logprobs],
            "top_logprobs": top,
            "text_offset": offsets,
        }


@dataclass
class EchoedPrompt:
    """A prompt as `echo` returns it: its text (its tokens decoded, so a prompt of token ids
    shows as the text they make), each token's text and character offset in it."""

    text: str
    tokens: list[str]
    offsets: list[int]

    @classmethod
    def of(cls, tokenizer, ids: list[int]) -> EchoedPrompt:
        detok = IncrementalDetokenizer(tokenizer)
        tokens, offsets = [], []
        for t in ids:
            offsets.append(len(detok.text))
            detok.push(t)
            tokens.append(token_text(tokenizer, t))
        detok.flush()
        return cls(detok.text, tokens, offsets)

    def logprobs(self, tokenizer, scored: PromptLogprobs | None, top_n: int) -> dict:
        """The prompt's part of a choice's legacy logprobs: the first token's logprob and
        alternatives are null (nothing predicts it). `scored` None (a request that ended before
        its prompt was read: a timeout, shutdown) leaves every logprob null."""
        n = len(self.tokens)
        lps = scored.logprobs if scored is not None else [None] * n
        tops = scored.top_logprobs if scored is not None else [None] * n
        top = None
        if top_n:
            top = [
                None if alts is None else {token_text(tokenizer, t): finite(lp) for t, lp in alts.items()}
                for alts in tops
            ]
        return {
            "tokens": list(self.tokens),
            "token_logprobs": [None if lp is None else finite(lp) for lp in lps],
            "top_logprobs": top,
            "text_offset": list(self.offsets),
        }


def join_logprobs(first: dict, then: dict) -> dict:
    """Two parts of a choice's legacy logprobs (the echoed prompt's, the completion's) as one."""
    top = (
        None if first["top_logprobs"] is None else first["top_logprobs"] + then["top_logprobs"]
    )  # same top_n
    return {
        "tokens": first["tokens"] + then["tokens"],
        "token_logprobs": first["token_logprobs"] + then["token_logprobs"],
        "top_logprobs": top,
        "text_offset": first["text_offset"] + then["text_offset"],
    }


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
