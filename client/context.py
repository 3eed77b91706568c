"""Fitting a conversation to the model's context before each turn, so that a chat keeps going
on a small model: the leading system message and the newest turns stay, the oldest turns go.

The server counts: `POST /tokenize` with the messages gives the prompt's tokens as its chat
template renders them (generation prompt included) and the model's context. A server without
that route gets the conversation as it is, and its own answer if it is too long.
"""

from __future__ import annotations

from dataclasses import dataclass

from .api import ChatClient

# Room kept for a reply when dropping old turns: --max-tokens, else this many tokens (the server's
# usual default), at most half the context, so that the conversation keeps the other half.
REPLY_ROOM = 256


class DoesNotFit(Exception):
    """Even the newest message alone (with the system message) leaves no room for a reply."""

    def __init__(self, tokens: int, context: int):
        super().__init__(
            f"this message does not fit: it makes a prompt of {tokens} tokens, and the model's context "
            f"is {context} tokens (not sent; the chat goes on)"
        )
        self.tokens, self.context = tokens, context


@dataclass
class Fit:
    messages: list[dict]  # what to send: the conversation, its oldest turns dropped if need be
    dropped: int = 0  # how many messages were dropped from the front
    prompt_tokens: int | None = None  # None: the server cannot count (no /tokenize)
    context: int | None = None  # the model's context in tokens, where known
    max_tokens: int | None = None  # what to ask for: --max-tokens capped to the room left


def reply_room(context: int, max_tokens: int | None) -> int:
    """The room a fitted prompt leaves for the reply (at least 1 token)."""
    return max(1, min(max_tokens or REPLY_ROOM, context // 2))


def fit(
    client: ChatClient,
    model: str,
    messages: list[dict],
    keep: int,
    max_tokens: int | None,
    context: int | None = None,
) -> Fit:
    """`messages` (its first `keep` ones never dropped, its last the new user message) fitted to
    the model's context: whole turns dropped from the front until the prompt leaves
    `reply_room` tokens, or only the newest message is left. Raises DoesNotFit where that
    message leaves no room at all, ChatError where the server fails."""
    counted = client.count_tokens(messages, model)
    if counted is None:
        return Fit(list(messages), context=context, max_tokens=max_tokens)
    count, context = counted[0], counted[1] or context
    if context is None:
        return Fit(list(messages), prompt_tokens=count, max_tokens=max_tokens)
    want = reply_room(context, max_tokens)
    kept, dropped = list(messages), 0
    while context - count < want and len(kept) - keep > 1:
        # the oldest turn: its first message and whatever follows up to the next user message
        end = keep + 1
        while end < len(kept) - 1 and kept[end].get("role") != "user":
            end += 1
        dropped += end - keep
        del kept[keep:end]
        counted = client.count_tokens(kept, model)
        if counted is None:  # the route went away: send what is left
            break
        count = counted[0]
    room = context - count
    if room < 1:
        raise DoesNotFit(count, context)
    capped = None if max_tokens is None else min(max_tokens, room)
    return Fit(kept, dropped=dropped, prompt_tokens=count, context=context, max_tokens=capped)


def cut_note(fit: Fit, usage: dict | None, wanted: int | None) -> str:
    """The note for a reply that ended with finish_reason "length": what cut it."""
    u = usage or {}
    used = sum(v for v in (u.get("prompt_tokens"), u.get("completion_tokens")) if isinstance(v, int))
    capped = wanted is not None and fit.max_tokens is not None and fit.max_tokens < wanted
    if fit.context and (used >= fit.context or capped):
        return f"(reply cut: it filled the model's {fit.context}-token context)"
    if wanted is not None:
        return f"(reply cut at --max-tokens {wanted})"
    return "(reply cut at the server's limit for one reply; --max-tokens sets another)"
