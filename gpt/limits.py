"""What fits in a model's context: the one place that checks prompts and token budgets.

The library (`gpt.complete`, beam search), the server's engine and its HTTP routes all ask a
`ContextLimits` whether a prompt and a number of new tokens fit, so the rules and the error
messages are written once. Errors are `RequestError`s naming the parameter at fault; the
caller says what its parameters are called (the library's `max_new_tokens` is the API's
`max_tokens`), and the HTTP layer turns them into 400s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


class RequestError(ValueError):
    """A request that cannot be served as asked. `param` names the offending parameter (a
    path into it for an element: "stop_token_ids.3"); `code` is OpenAI's error code for it
    ("invalid_value", "invalid_combination", "context_length_exceeded")."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str = "invalid_value",
        *,
        reason: str | None = None,
    ):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code
        self.reason = reason  # the message without its leading "param: ", when it has one

    @classmethod
    def of(cls, param: str, reason: str, code: str = "invalid_value") -> RequestError:
        """An error about one parameter, worded "param: reason" (as a server words its own)."""
        return cls(f"{param}: {reason}", param, code, reason=reason)

    def renamed(self, names: Mapping[str, str]) -> RequestError:
        """This error with its parameter called as the caller calls it: the library's
        max_new_tokens is an API's max_tokens ({"max_new_tokens": "max_tokens"}). An element's
        path keeps its tail (stop_token_ids.3)."""
        head, dot, tail = (self.param or "").partition(".")
        if head not in names:
            return self
        param = names[head] + dot + tail
        if self.reason is None:
            return RequestError(self.message, param, self.code)
        return RequestError.of(param, self.reason, self.code)


@dataclass(frozen=True)
class ContextLimits:
    """The limits of one model as served.

    A GPT's prompt and output share a cache row of `max_len` tokens. An encoder-decoder's source
    has a block of its own (`max_source_len`); its output, start token included, fills the row.
    """

    vocab_size: int  # prompt token ids must be in [0, vocab_size)
    max_len: int  # tokens per KV-cache row
    max_source_len: int  # the longest prompt: the encoder's block, or max_len - 1 for a GPT
    is_seq2seq: bool
    max_prompt_tokens: int | None = None  # an operator's cap below what the model takes

    @classmethod
    def of(
        cls, model, tokenizer=None, *, max_len: int | None = None, max_prompt_tokens: int | None = None
    ) -> ContextLimits:
        """The limits of `model` (and its tokenizer, whose ids a prompt may use), with cache rows
        of `max_len` tokens (default and at most: the model's block size)."""
        config = model.config
        block = config.block_size
        if max_len is None:
            max_len = block
        if not 2 <= max_len <= block:
            raise ValueError(f"max_len must be in [2, {block}] (the model's block size), got {max_len}")
        if max_prompt_tokens is not None and max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
        vocab = config.vocab_size if tokenizer is None else min(config.vocab_size, tokenizer.vocab_size)
        seq2seq = config.is_seq2seq
        return cls(
            vocab_size=vocab,
            max_len=max_len,
            max_source_len=block if seq2seq else max_len - 1,
            is_seq2seq=seq2seq,
            max_prompt_tokens=max_prompt_tokens,
        )

    def room(self, prompt_len: int) -> int:
        """How many new tokens fit after a prompt of `prompt_len` tokens."""
        return self.max_len - 1 if self.is_seq2seq else self.max_len - prompt_len

    def check_prompt(self, ids: Sequence[int], param: str = "prompt") -> list[int]:
        """The prompt's token ids as a list of ints, if it is non-empty, every id is in the
        vocabulary, and it leaves room for at least one new token."""
        try:
            ids = [int(t) for t in ids]
        except (TypeError, ValueError):
            raise RequestError("the prompt must be a string or a list of token ids", param) from None
        if not ids:
            raise RequestError("the prompt is empty", param)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is out of range [0, {self.vocab_size})", param)
        n = len(ids)
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise RequestError(
                f"the prompt has {n} tokens; this server accepts at most {self.max_prompt_tokens}",
                param,
                "context_length_exceeded",
            )
        if n > self.max_source_len:
            what = "the model's source context is" if self.is_seq2seq else "the model's context is"
            extra = "" if self.is_seq2seq else ", which leaves no room for new ones"
            limit = self.max_source_len if self.is_seq2seq else self.max_len
            raise RequestError(
                f"the prompt has {n} tokens; {what} {limit} tokens{extra}", param, "context_length_exceeded"
            )
        return ids

    def budget(
        self,
        prompt_len: int,
        wanted: int | None,
        *,
        default: int | None = None,
        clamp: bool = False,
        param: str = "max_new_tokens",
    ) -> int:
        """The number of new tokens to generate after a checked prompt of `prompt_len` tokens.

        wanted: an integer >= 0 (`SamplingParams.validate` checks it; 0 reads the prompt only).
        None: `default` (or all the room there is), shrunk to fit. A `wanted` that does not
        fit is an error naming `param`, or with `clamp` is shrunk to fit (the library's choice:
        the text then ends with finish reason "length" where the context is full)."""
        room = self.room(prompt_len)
        if wanted is None:
            return room if default is None else min(default, room)
        if wanted <= room or clamp:
            return min(wanted, room)
        if self.is_seq2seq:
            msg = f"{param} is {wanted}, but the model generates at most {room} tokens"
        else:
            msg = (
                f"the prompt has {prompt_len} tokens and {param} is {wanted}: {prompt_len + wanted} tokens, "
                f"more than the model's context of {self.max_len}"
            )
        raise RequestError(msg, param, "context_length_exceeded")

    def check_params(self, params) -> None:
        """Check SamplingParams against this model: its vocabulary, and whether it predicts its
        prompt (`SamplingParams.validate`)."""
        params.validate(self.vocab_size, seq2seq=self.is_seq2seq)

    def check(self, prompt_ids: Sequence[int], params, *, clamp: bool = False) -> tuple[list[int], int]:
        """Check a prompt and its SamplingParams together: (prompt ids, new-token budget)."""
        ids = self.check_prompt(prompt_ids)
        self.check_params(params)
        return ids, self.budget(len(ids), params.max_new_tokens, clamp=clamp)
